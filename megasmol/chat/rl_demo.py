"""``megasmol demo --rl``: GRPO on the SFT demo model on a CPU, nothing downloaded.

1. the SFT demo checkpoint (``megasmol demo --sft``; run first when missing);
2. verifiable arithmetic prompts ("What is A + B?", the sum as the reference answer), disjoint
   from held-out questions, rendered with SmolLM3's template by ``prepare-prompts``;
3. held-out accuracy of the SFT model (greedy, the SFT demo's grading);
4. GRPO with ``examples/tiny/grpo.yaml``: completions sampled by the model being trained, the
   math reward, group-relative advantages, DAPO's loss;
5. the reward over training and held-out accuracy after.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

GRPO_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "grpo.yaml"


def _rewards(run_dir: Path) -> list[tuple[int, float]]:
    from megasmol.runtime.run_dir import Kind, RunDir

    return [(r["step"], r["reward"]) for r in RunDir(run_dir).records(Kind.TRAIN) if "reward" in r]


def run_rl_demo(workdir: Path, steps: int = 30, overrides: list[str] | None = None,
                train_questions: int = 360, held_out: int = 40, high: int = 20) -> int:
    from megasmol.chat.demo import held_out_scores, sft_model
    from megasmol.config.run import load_run_config
    from megasmol.data.chat.synthetic import split_arithmetic
    from megasmol.data.masked.layout import tokenizer_path
    from megasmol.data.prompts.prepare import prepare_prompts
    from megasmol.data.prompts.synthetic import write_arithmetic_prompts
    from megasmol.runtime.distributed import init_distributed, shutdown
    from megasmol.train.loop import train
    from megasmol.utils.table import format_table

    started = time.time()
    workdir = Path(workdir).resolve()
    sft = sft_model(workdir, "the policy's start")
    if sft is None:
        return 1
    rl = workdir / "rl"
    shutil.rmtree(rl, ignore_errors=True)
    (rl / "prompts").mkdir(parents=True)
    train_pairs, test_pairs = split_arithmetic(train_questions, held_out, seed=11, high=high)
    write_arithmetic_prompts(rl / "arithmetic.jsonl", train_pairs)
    summary = prepare_prompts([str(rl / "arithmetic.jsonl")], str(rl / "prompts" / "arithmetic"),
                              template="smollm3", show_progress=False)
    print(f"[2/5] {summary.prompts} arithmetic prompts with their sums as reference answers; "
          f"{held_out} held-out questions never trained on")
    chat_tokenizer = tokenizer_path(rl / "prompts" / "arithmetic")
    before = held_out_scores(sft, chat_tokenizer, test_pairs)
    print(f"[3/5] SFT model on the held-out questions: {100 * before[2]:.0f}% right sums, "
          f"{100 * before[0]:.0f}% in the answer format")
    init_distributed()
    try:
        config = load_run_config(GRPO_CONFIG, [
            f"run_dir={rl / 'run'}", f"data.root={rl / 'prompts'}", f"checkpoint.init_from={sft}",
            f"training.train_steps={steps}", f"checkpoint.interval={steps}", *(overrides or [])])
        groups = config.training.global_batch_size // config.rl.num_generations
        print(f"[4/5] GRPO ({config.rl.loss_type} loss) for {steps} steps: {groups} prompts x "
              f"{config.rl.num_generations} completions sampled per step by the model being trained")
        result = train(config)
    finally:
        shutdown()
    rewards = _rewards(rl / "run")
    after = held_out_scores(result.checkpoint, chat_tokenizer, test_pairs)
    third = max(1, len(rewards) // 3)
    early = sum(r for _, r in rewards[:third]) / third
    late = sum(r for _, r in rewards[-third:]) / third
    rows = [("model", "train reward", "sum right", "answer format")]
    for label, reward, scores in (("SFT (start)", f"{early:.2f} (first third)", before),
                                  ("after GRPO", f"{late:.2f} (last third)", after)):
        rows.append((label, reward, f"{100 * scores[2]:.0f}%", f"{100 * scores[0]:.0f}%"))
    print(f"[5/5] training reward and held-out questions ({held_out}):")
    print("      " + format_table(rows).replace("\n", "\n      "))
    learned = late > early and after[2] >= before[2]
    print(f"RL demo finished in {time.time() - started:.0f}s: "
          + ("the reward rose and held-out accuracy did not fall" if learned
             else "RL did NOT take as expected"))
    return 0 if learned else 1
