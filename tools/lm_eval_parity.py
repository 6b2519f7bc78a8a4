#!/usr/bin/env python3
"""Check megasmol's downstream numbers against lm-evaluation-harness on your own model.

Any task megasmol can load (a built-in or embedded name, a YAML, a JSONL file) is written out as
a JSONL file of rendered ``{context, choices, gold}`` items and scored twice on the same Hugging
Face model: by lm-eval's ``HFLM`` (a custom ``multiple_choice`` task over that file, with
``acc``, ``acc_norm``, ``acc_bytes`` and ``acc_mutual_info``) and by ``megasmol eval tasks``'
scorers (transformers for ``--hf``, and the Megatron-Core model too with ``--checkpoint``).
Prints the largest log-likelihood difference, the number of examples whose prediction differs
per metric, and both aggregate scores; exit status 1 when they disagree. Cloze tasks only.

    python tools/lm_eval_parity.py --hf runs/demo/hf --checkpoint runs/demo/run/checkpoints \\
        --task demo_word_order --limit 200

Needs ``lm-eval`` (a test dependency: ``pip install -e .[dev]``). Offline: it sets
``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

METRICS = ("acc", "acc_norm", "acc_bytes", "acc_mutual_info")


def _lm_eval(hf: str, items: Path, delimiter: str, work: Path, batch_size: str):
    import lm_eval
    import yaml
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    (work / "tasks").mkdir(exist_ok=True)
    (work / "tasks" / "megasmol_parity.yaml").write_text(yaml.safe_dump({
        "task": "megasmol_parity", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(items)}}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}", "target_delimiter": delimiter,
        "metric_list": [{"metric": m} for m in METRICS]}))
    lm = HFLM(pretrained=hf, device="cpu", dtype="float32", batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=["megasmol_parity"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(work / "tasks"),
                                                           include_defaults=False))
    samples = sorted(out["samples"]["megasmol_parity"], key=lambda s: s["doc_id"])
    return ([[r[0][0] for r in s["resps"]] for s in samples],
            {m: [s[m] for s in samples] for m in METRICS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf", required=True, help="Hugging Face model directory")
    parser.add_argument("--checkpoint", help="also score the megasmol checkpoint the export came from")
    parser.add_argument("--task", required=True, help="a task megasmol can load (cloze formulation)")
    parser.add_argument("--limit", type=int, help="a fixed, seeded subset of this many examples")
    parser.add_argument("--seed", type=int, default=1234, help="seed for --limit (default 1234)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest log-likelihood difference accepted (default 1e-4)")
    parser.add_argument("--lm-eval-batch-size", default="8", help="lm-eval's batch size (default 8)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from megasmol.eval.runner import evaluate
    from megasmol.eval.scoring.scorers import hf_scorer, megatron_scorer
    from megasmol.eval.tasks.registry import load_task
    from megasmol.eval.tasks.spec import TaskSpec
    from megasmol.eval.tasks.task import Task, sample
    from megasmol.tokenizer import load_tokenizer
    from megasmol.utils.table import format_table

    source = load_task(args.task)
    if source.spec.formulation != "cf":
        parser.error(f"{args.task} is {source.spec.formulation}; this check compares cloze tasks")
    examples = sample(source.examples(), args.limit, args.seed)
    delimiter = source.spec.target_delimiter
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        items = work / "items.jsonl"
        items.write_text("".join(json.dumps({"context": e.context, "choices": e.choices, "gold": e.gold})
                                 + "\n" for e in examples))
        task = Task(TaskSpec(name="parity", data_files=str(items), target_delimiter=delimiter,
                             metrics=list(METRICS)), work)
        tokenizer = load_tokenizer(args.hf)
        scorers = [("megasmol --hf", lambda: hf_scorer(args.hf, tokenizer))]
        if args.checkpoint:
            scorers.append(("megasmol --checkpoint", lambda: megatron_scorer(args.checkpoint, tokenizer)))
        mine = {}
        for name, make in scorers:
            [mine[name]] = evaluate([task], make())
        expected_lls, expected = _lm_eval(args.hf, items, delimiter, work, args.lm_eval_batch_size)

    rows = [("scorer", "max |Δ loglik|", *[f"{m} (differs)" for m in METRICS])]
    rows.append(("lm-eval HFLM", "-", *[f"{sum(v) / len(v):.4f}" for v in expected.values()]))
    agree = True
    for name, result in mine.items():
        delta = max(abs(a - b) for s, theirs in zip(result.samples, expected_lls)  # unconditional too
                    for a, b in zip(s.loglikelihoods + (s.unconditional or []), theirs, strict=True))
        cells = []
        for metric in METRICS:
            differs = sum(s.metrics[metric] != v for s, v in zip(result.samples, expected[metric]))
            agree &= differs == 0
            cells.append(f"{result.metrics[metric][0]:.4f} ({differs})")
        agree &= delta <= args.tolerance
        rows.append((name, f"{delta:.2e}", *cells))
    print(f"{args.task}: {len(examples)} examples on {args.hf}")
    print(format_table(rows))
    print("agree with lm-eval" if agree else "DISAGREE with lm-eval")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
