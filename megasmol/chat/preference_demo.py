"""``megasmol demo --preference``: APO-zero on the SFT demo model on a CPU, nothing downloaded.

1. the SFT demo checkpoint (``megasmol demo --sft``; run first when missing);
2. generated preference pairs -- "What is A + B?" with the correct "A + B = C." chosen over a sum
   10-30 too large -- rendered with SmolLM3's template by ``prepare-preferences``;
3. held-out arithmetic accuracy of the SFT model (the downstream score before);
4. APO-zero with ``examples/tiny/apo.yaml`` (packed pairs; the SFT checkpoint is the reference,
   its log-probs computed once before step 1);
5. held-out reward accuracy (pairs never trained on; 0 before training, where every reward is 0)
   and the held-out arithmetic accuracy after.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

APO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "apo.yaml"


def arithmetic_preference_pairs(questions, seed: int) -> list[dict]:
    """One pair per question: the correct sum chosen, a sum 10-30 too large rejected (wrong by a
    margin a 4-layer model can learn to see; off-by-one sums need arithmetic it does not have)."""
    from megasmol.data.chat.synthetic import ANSWER, QUESTION, SYSTEM

    rng = random.Random(seed)
    records = []
    for a, b in questions:
        wrong = a + b + rng.randint(10, 30)
        records.append({"prompt": [{"role": "system", "content": SYSTEM},
                                   {"role": "user", "content": QUESTION.format(a=a, b=b)}],
                        "chosen": [{"role": "assistant", "content": ANSWER.format(a=a, b=b, c=a + b)}],
                        "rejected": [{"role": "assistant", "content": ANSWER.format(a=a, b=b, c=wrong)}]})
    return records


def _last_validation(run_dir: Path) -> dict:
    from megasmol.runtime.run_dir import Kind, RunDir

    return RunDir(run_dir).records(Kind.VALIDATION)[-1]


def run_preference_demo(workdir: Path, steps: int = 60, overrides: list[str] | None = None,
                        train_questions: int = 360, held_out: int = 40, high: int = 20) -> int:
    from megasmol.chat.demo import held_out_scores, sft_model
    from megasmol.config.run import load_run_config
    from megasmol.data.chat.synthetic import split_arithmetic, write_jsonl
    from megasmol.data.masked.layout import tokenizer_path
    from megasmol.data.preference.prepare import prepare_preferences
    from megasmol.runtime.distributed import init_distributed, shutdown
    from megasmol.train.loop import train
    from megasmol.utils.table import format_table

    started = time.time()
    workdir = Path(workdir).resolve()
    sft = sft_model(workdir, "the policy's start and the reference")
    if sft is None:
        return 1
    pref = workdir / "pref"
    shutil.rmtree(pref, ignore_errors=True)
    (pref / "tokens").mkdir(parents=True)
    train_pairs, test_pairs = split_arithmetic(train_questions, held_out, seed=7, high=high)
    write_jsonl(arithmetic_preference_pairs(train_pairs, seed=3), pref / "pairs.jsonl")
    summary = prepare_preferences([str(pref / "pairs.jsonl")], str(pref / "tokens" / "arithmetic-pairs"),
                                  template="smollm3", show_progress=False)
    print(f"[2/5] {summary.pairs} preference pairs (correct sum chosen, one 10-30 too large rejected), "
          f"{summary.tokens:,} tokens; {held_out} held-out questions never trained on")
    chat_tokenizer = tokenizer_path(pref / "tokens" / "arithmetic-pairs")
    before = held_out_scores(sft, chat_tokenizer, test_pairs)
    print(f"[3/5] SFT model on the held-out questions: {100 * before[2]:.0f}% right sums, "
          f"{100 * before[0]:.0f}% in the answer format")
    init_distributed()
    try:
        config = load_run_config(APO_CONFIG, [
            f"run_dir={pref / 'run'}", f"data.root={pref / 'tokens'}", f"checkpoint.init_from={sft}",
            f"training.train_steps={steps}", f"checkpoint.interval={steps}",
            f"eval.interval={max(1, steps // 2)}", f"schedule.warmup_steps={max(1, steps // 10)}",
            *(overrides or [])])
        print(f"[4/5] APO-zero (beta {config.preference.beta}) for {steps} steps, "
              f"{config.training.global_batch_size} packed sequences of {config.data.seq_length} tokens")
        result = train(config)
    finally:
        shutdown()
    held = _last_validation(pref / "run")
    after = held_out_scores(result.checkpoint, chat_tokenizer, test_pairs)
    rows = [("model", "held-out reward acc", "reward margin", "sum right", "answer format"),
            ("SFT (reference)", "0.00 (all rewards 0)", "0.000", f"{100 * before[2]:.0f}%",
             f"{100 * before[0]:.0f}%"),
            ("after APO-zero", f"{held['rewards/accuracies']:.2f}", f"{held['rewards/margins']:.3f}",
             f"{100 * after[2]:.0f}%", f"{100 * after[0]:.0f}%")]
    print(f"[5/5] held-out pairs ({held['pairs']}) and questions ({held_out}):")
    print("      " + format_table(rows).replace("\n", "\n      "))
    learned = held["rewards/accuracies"] >= 0.7
    print(f"preference demo finished in {time.time() - started:.0f}s: "
          + ("the model prefers the correct answers it was not trained on" if learned
             else "the preference did NOT take as expected"))
    return 0 if learned else 1
