"""Examples per second of ``megasmol eval tasks`` against lm-evaluation-harness, same model,
same task, same cores, in one process (the ratio is what to read on a shared machine).

The model is a random ``smollm3-tiny`` (Llama-3.2 vocabulary), or with ``--model wide`` a random
SmolLM3-architecture model shaped like SmolLM2-135M (28 layers: NoPE every 4th; 576 wide, 9 / 3 heads,
FFN 1536; ~180M parameters with the 128k vocabulary, so the transformer, not the output layer,
is most of the cost), exported to Hugging Face format. The task is the embedded
``demo_arithmetic`` or, with ``--task NAME``, the first rows of a built-in task's shipped split
(megasmol[evaldata]; ``hellaswag``, ``arc_easy``, ``mmlu_mcf``, ...), written out as a task file
of megasmol's 0-shot prompts and continuations (lm-eval's preprocessing already applied).
lm-eval runs ``HFLM`` with the same file as a custom task; megasmol runs its transformers
scorer and its Megatron-Core scorer, each with the shared-context path (a question's choices
against one pass over their context) and without it. All score
identical requests (checked: the same accuracy).

    python bench/eval_throughput.py --examples 200 --workdir /tmp/eval-bench
    python bench/eval_throughput.py --model wide --task hellaswag --examples 40 --workdir /tmp/eval-wide
    python bench/eval_throughput.py --model wide --task hellaswag --shots 5 --examples 20 \
        --workdir /tmp/eval-wide
    python bench/eval_throughput.py --model wide --task mmlu_mcf --examples 40 --workdir /tmp/eval-wide
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument("--lm-eval-batch-size", default="8", help="lm-eval's --batch_size (default 8)")
    parser.add_argument("--workdir", default="/tmp/eval-bench")
    parser.add_argument("--model", choices=["tiny", "wide"], default="tiny")
    parser.add_argument("--task", default="demo_arithmetic",
                        help="demo_arithmetic (embedded), or a built-in task whose choices share "
                             "their context (cf or mcf: hellaswag, arc_easy, piqa, mmlu_mcf, ...), "
                             "rendered as megasmol renders it 0-shot")
    parser.add_argument("--warm", action="store_true",
                        help="score the first 4 questions once before timing each megasmol scorer "
                             "(first-call costs out of the figure)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each megasmol scorer this many times, in turns, and report the "
                             "median (lm-eval runs once)")
    parser.add_argument("--shots", type=int, default=0,
                        help="put the K preceding questions with their right answers before each "
                             "question (a fixed few-shot prompt both tools score as it is)")
    args = parser.parse_args()
    if args.shots and args.task != "hellaswag":
        parser.error("--shots takes its examples from HellaSwag's split: use --task hellaswag")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)

    from megasmol.convert.export import export_hf
    from megasmol.eval.formulations.registry import prompt_and_continuations
    from megasmol.eval.runner import evaluate
    from megasmol.eval.scoring.scorers import hf_scorer, megatron_scorer
    from megasmol.eval.tasks.embedded import arithmetic_examples
    from megasmol.eval.tasks.registry import load_task
    from megasmol.eval.tasks.task import file_task
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec
    from megasmol.tokenizer import default_tokenizer_dir, load_tokenizer

    if not (work / "hf" / "config.json").is_file():
        spec = load_model_spec("smollm3-tiny")
        if args.model == "wide":
            spec = spec.replace(name="smollm3-wide-bench", num_layers=28, hidden_size=576,
                                ffn_hidden_size=1536, num_attention_heads=9, num_kv_heads=3,
                                head_dim=64)
        init_checkpoint(spec, work / "ckpt", seed=3, tokenizer=default_tokenizer_dir())
        export_hf(work / "ckpt", work / "hf", show_progress=False)
    items = work / f"{args.task}.jsonl"
    if args.task == "demo_arithmetic":
        examples, formulation, delimiter = arithmetic_examples(args.examples, 99), "cf", " "
    else:
        task = load_task(args.task)
        formulation, delimiter = task.spec.formulation, task.spec.target_delimiter
        if formulation not in ("cf", "mcf"):
            parser.error(f"--task {args.task}: a {formulation} task; the benchmark takes cf or mcf "
                         "tasks (one context, several continuations)")
        examples = task.examples()[:args.examples]
    pool = load_task("hellaswag").examples() if args.shots else []
    shots = pool[len(pool) - args.shots:]  # from the end of the split, never the questions

    def item(example) -> str:
        prompt, continuations = prompt_and_continuations(example, formulation, delimiter, shots)
        return json.dumps({"context": prompt, "choices": continuations, "gold": example.gold})

    items.write_text("".join(item(e) + "\n" for e in examples))
    tokenizer = load_tokenizer(default_tokenizer_dir())

    timings, accuracy = {}, {}
    def plain(scorer):
        scorer.prefix = None  # every (context, continuation) pair scored whole, as lm-eval does
        return scorer

    # Once a Megatron-Core model is loaded, megasmol's CPU compatibility mode is on for the rest of
    # the process; `megasmol eval tasks --hf` and lm-eval never run under it, so here they run
    # with it suspended (as the Megatron-Core scorer's own forwards do).
    from megasmol.runtime import cpu_compat

    scorers = {"megasmol --hf": hf_scorer(work / "hf", tokenizer),
               "megasmol --hf, each pair whole": plain(hf_scorer(work / "hf", tokenizer)),
               "megasmol --checkpoint": megatron_scorer(work / "ckpt", tokenizer),
               "megasmol --checkpoint, each pair whole": plain(megatron_scorer(work / "ckpt", tokenizer))}
    runs: dict[str, list[float]] = {name: [] for name in scorers}
    for round_ in range(args.repeat):
        for name, scorer in scorers.items():
            if args.warm and round_ == 0:
                warm = file_task(items)
                warm._examples = warm.examples()[:4]
                with cpu_compat.suspended():
                    evaluate([warm], scorer)
            started = time.perf_counter()
            with cpu_compat.suspended():
                [result] = evaluate([file_task(items)], scorer)
            runs[name].append(time.perf_counter() - started)
            accuracy[name] = result.metrics["acc"][0]
    timings = {name: statistics.median(seconds) for name, seconds in runs.items()}

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
    with cpu_compat.suspended():
        out = lm_eval.simple_evaluate(model=lm, tasks=["bench_arith"], task_manager=manager)
    timings["lm-eval HFLM"] = time.perf_counter() - started
    accuracy["lm-eval HFLM"] = out["results"]["bench_arith"]["acc,none"]

    base = timings["lm-eval HFLM"]
    choices, threads = sum(len(e.choices) for e in examples), __import__("torch").get_num_threads()
    print(f"model {args.model}, task {args.task}, {args.shots}-shot: {len(examples)} examples, "
          f"{choices} choices, torch threads {threads}, megasmol scorers: median of {args.repeat} "
          "turn(s)")
    print("| scorer | seconds | examples/s | speed vs lm-eval | acc |")
    print("|---|---|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {seconds:.1f} | {len(examples) / seconds:.1f} | {base / seconds:.2f}x | "
              f"{accuracy[name]:.3f} |")


if __name__ == "__main__":
    main()
