"""Examples per second of ``megasmol eval tasks`` against lm-evaluation-harness, same model,
same task, same cores, in one process (the ratio is what to read on a shared machine).

The model is a random ``smollm3-tiny`` (Llama-3.2 vocabulary) exported to Hugging Face format;
the task is the embedded ``demo_arithmetic`` written out as a task file (4 choices each). lm-eval
runs ``HFLM`` with the same file as a custom task; megasmol runs its transformers scorer and its
Megatron-Core scorer. Both score identical requests (checked: the same accuracy).

    python bench/eval_throughput.py --examples 200 --workdir /tmp/eval-bench
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--lm-eval-batch-size", default="8", help="lm-eval's --batch_size (default 8)")
    parser.add_argument("--workdir", default="/tmp/eval-bench")
    args = parser.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from megasmol.convert.export import export_hf
    from megasmol.eval.embedded import arithmetic_examples
    from megasmol.eval.runner import evaluate
    from megasmol.eval.scorers import hf_scorer, megatron_scorer
    from megasmol.eval.tasks import file_task
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec
    from megasmol.tokenizer import default_tokenizer_dir, load_tokenizer

    if not (work / "hf" / "config.json").is_file():
        init_checkpoint(load_model_spec("smollm3-tiny"), work / "ckpt", seed=3,
                        tokenizer=default_tokenizer_dir())
        export_hf(work / "ckpt", work / "hf", show_progress=False)
    items = work / "arith.jsonl"
    examples = arithmetic_examples(args.examples, 99)
    items.write_text("".join(json.dumps({"context": e.context, "choices": [" " + c for c in e.choices],
                                         "gold": e.gold}) + "\n" for e in examples))
    tokenizer = load_tokenizer(default_tokenizer_dir())

    timings, accuracy = {}, {}
    for name, make in (("megasmol --hf", lambda: hf_scorer(work / "hf", tokenizer)),
                       ("megasmol --checkpoint", lambda: megatron_scorer(work / "ckpt", tokenizer))):
        scorer = make()
        started = time.perf_counter()
        [result] = evaluate([file_task(items)], scorer)
        timings[name] = time.perf_counter() - started
        accuracy[name] = result.metrics["acc"][0]

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "bench_arith.yaml").write_text(yaml.safe_dump({
        "task": "bench_arith", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(items)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}", "doc_to_target": "{{gold}}", "target_delimiter": "",
        "metric_list": [{"metric": "acc"}]}))
    lm = HFLM(pretrained=str(work / "hf"), device="cpu", dtype="float32",
              batch_size=args.lm_eval_batch_size)
    manager = TaskManager(include_path=str(work / "tasks"))
    started = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=["bench_arith"], task_manager=manager)
    timings["lm-eval HFLM"] = time.perf_counter() - started
    accuracy["lm-eval HFLM"] = out["results"]["bench_arith"]["acc,none"]

    base = timings["lm-eval HFLM"]
    print(f"{args.examples} examples x 4 choices, torch threads {__import__('torch').get_num_threads()}")
    print("| scorer | seconds | examples/s | speed vs lm-eval | acc |")
    print("|---|---|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.1f} | {args.examples / seconds:.1f} | {base / seconds:.2f}x | "
              f"{accuracy[name]:.3f} |")


if __name__ == "__main__":
    main()
