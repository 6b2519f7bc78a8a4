"""``megasmol demo --sft``: supervised fine-tuning of the demo model on a CPU, nothing downloaded.

1. the pretrained demo checkpoint (``megasmol demo``; trained first when missing);
2. generated arithmetic conversations ("What is A + B?" -> "A + B = C."), disjoint train and
   held-out questions, rendered with SmolLM3's template by ``prepare-chat``;
3. held-out accuracy of the pretrained model, prompted with the same template;
4. SFT with ``examples/tiny/sft.yaml`` (assistant-only loss, FFD packing);
5. held-out accuracy after SFT, and a ``megasmol chat --message`` exchange.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from megasmol.utils.fs import shown

SFT_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "sft.yaml"


def held_out_scores(checkpoint: Path, tokenizer_dir: Path, questions, max_new_tokens: int = 16):
    """(format share, operands-echoed share, accuracy, an example) over the held-out questions."""
    from megasmol.chat.session import ChatSession
    from megasmol.data.chat.synthetic import QUESTION, SYSTEM, grade
    from megasmol.utils.progress import progress_bar

    session = ChatSession.from_checkpoint(checkpoint, tokenizer=str(tokenizer_dir), template="smollm3",
                                          system=SYSTEM, max_new_tokens=max_new_tokens)
    formatted = echoed = correct = 0
    example = None
    with progress_bar(len(questions), "held-out", unit="q") as bar:
        for a, b in questions:
            session.reset()
            reply = session.reply(QUESTION.format(a=a, b=b))
            ok_format, ok_echo, ok = grade(reply, a, b)
            formatted += ok_format
            echoed += ok_echo
            correct += ok
            example = example or (QUESTION.format(a=a, b=b), reply)
            bar.update(1)
    n = len(questions)
    return formatted / n, echoed / n, correct / n, example


def sft_model(workdir: Path, role: str) -> Path | None:
    """The SFT demo's checkpoint under ``workdir`` (``megasmol demo --sft`` run first when
    missing), said as step 1 of a demo that starts from it; None when the SFT demo failed."""
    sft = workdir / "sft" / "run" / "checkpoints"
    if (sft / "latest").is_file():
        print(f"[1/5] SFT demo model ({role}): {shown(sft)}")
        return sft
    print(f"[1/5] no SFT demo model in {shown(sft)}: running `megasmol demo --sft` first")
    if run_sft_demo(workdir) != 0:
        print("the SFT demo failed; stopping")
        return None
    return sft


def run_sft_demo(workdir: Path, steps: int = 150, overrides: list[str] | None = None,
                 train_questions: int = 360, held_out: int = 40, high: int = 20) -> int:
    from megasmol.config.run import load_run_config
    from megasmol.data.chat.prepare import prepare_chat
    from megasmol.data.chat.synthetic import SYSTEM, arithmetic_record, split_arithmetic, write_jsonl
    from megasmol.data.masked.layout import tokenizer_path
    from megasmol.demo import run_demo
    from megasmol.runtime.distributed import init_distributed, shutdown
    from megasmol.train.loop import train
    from megasmol.utils.table import format_table

    started = time.time()
    workdir = Path(workdir).resolve()
    pretrained = workdir / "run" / "checkpoints"
    if not (pretrained / "latest").is_file():
        print(f"[1/5] no pretrained demo model in {shown(pretrained)}: running `megasmol demo` first")
        if run_demo(workdir) != 0:
            print("the pretraining demo failed; stopping")
            return 1
    else:
        print(f"[1/5] pretrained demo model: {shown(pretrained)}")
    sft = workdir / "sft"
    shutil.rmtree(sft, ignore_errors=True)
    (sft / "tokens").mkdir(parents=True)
    train_pairs, test_pairs = split_arithmetic(train_questions, held_out, seed=7, high=high)
    write_jsonl([arithmetic_record(a, b) for a, b in train_pairs], sft / "arithmetic.jsonl")
    summary = prepare_chat([str(sft / "arithmetic.jsonl")], str(sft / "tokens" / "arithmetic"),
                           template="smollm3", show_progress=False)
    print(f"[2/5] {summary.conversations} training conversations, {summary.tokens:,} tokens, "
          f"{100 * summary.supervised_share:.0f}% supervised (assistant replies + <|im_end|>); "
          f"{held_out} held-out questions")
    chat_tokenizer = tokenizer_path(sft / "tokens" / "arithmetic")
    before = held_out_scores(pretrained, chat_tokenizer, test_pairs)
    print(f"[3/5] before SFT: {100 * before[2]:.0f}% correct, {100 * before[0]:.0f}% in the answer format; "
          f"e.g. {before[3][0]!r} -> {before[3][1]!r}")
    init_distributed()
    try:
        config = load_run_config(SFT_CONFIG, [
            f"run_dir={sft / 'run'}", f"data.root={sft / 'tokens'}", f"checkpoint.init_from={pretrained}",
            f"training.train_steps={steps}", f"schedule.warmup_steps={min(10, max(1, steps // 15))}",
            f"eval.interval={max(1, steps // 3)}", f"checkpoint.interval={steps}", *(overrides or [])])
        print(f"[4/5] SFT of the demo model for {steps} steps ({config.training.global_batch_size} x "
              f"{config.data.seq_length} tokens per step, packing {config.data.packing})")
        result = train(config)
    finally:
        shutdown()
    after = held_out_scores(result.checkpoint, chat_tokenizer, test_pairs)
    rows = [("model", "answer format", "operands right", "sum right")]
    for label, scores in (("pretrained", before), ("after SFT", after)):
        rows.append((label, *(f"{100 * share:.0f}%" for share in scores[:3])))
    print(f"[5/5] held-out questions ({held_out}, none seen in training):")
    print("      " + format_table(rows).replace("\n", "\n      "))
    print(f"      megasmol chat --checkpoint {shown(result.checkpoint)} --system {SYSTEM!r} "
          f"--message {after[3][0]!r}")
    print(f"      assistant> {after[3][1]}")
    learned = after[0] > before[0] and after[0] >= 0.5
    print(f"SFT demo finished in {time.time() - started:.0f}s: "
          + ("the model answers in the trained format" if learned else "SFT did NOT take as expected"))
    return 0 if learned else 1
