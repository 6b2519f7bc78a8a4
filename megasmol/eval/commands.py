"""``megasmol eval``: the command-line side of the evaluations (tasks here, passkey in longctx/)."""

from __future__ import annotations

import os
from pathlib import Path

from megasmol.utils.argtypes import add_model_choice, positive_int
from megasmol.utils.fs import shown


def cmd_eval_tasks(args) -> int:
    from megasmol.config.typed import ConfigError

    # Argument mistakes first, before torch and transformers load.
    if bool(args.checkpoint) == bool(args.hf):
        raise ConfigError("give exactly one of --checkpoint or --hf")
    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    if args.num_fewshot < 0:
        raise ConfigError("--num-fewshot must be >= 0")
    if args.batch_tokens < 1:
        raise ConfigError(f"--batch-tokens must be >= 1, got {args.batch_tokens}")
    _check_out(args.out)  # before the scoring, whose results would be lost
    if args.hf:
        from megasmol.convert.hf_dir import check_hf_model_dir

        check_hf_model_dir(args.hf)
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise ConfigError("--tasks names no task")
    from megasmol.eval.api import Evaluation

    # A mistyped name (hellaswg) is one line before torch loads.
    evaluation = Evaluation(names, limit=args.limit, num_fewshot=args.num_fewshot, seed=args.seed)

    from tqdm import tqdm

    from megasmol.ckpt.checkpoint import tokenizer_dir
    from megasmol.eval.outputs import write_new_report, write_report
    from megasmol.eval.scoring.scorers import hf_scorer, megatron_scorer
    from megasmol.runtime.distributed import shutdown
    from megasmol.tokenizer import load_tokenizer

    evaluation.read()  # so is data that cannot be read (a bad row, an offline hub dataset)
    source = args.tokenizer or (tokenizer_dir(args.checkpoint) if args.checkpoint else args.hf)
    if source is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer stored with it; pass --tokenizer DIR")
    tokenizer = load_tokenizer(source)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not args.checkpoint:
        raise ConfigError("under torchrun, score a --checkpoint (the Megatron-Core model)")
    rank0 = int(os.environ.get("RANK", "0")) == 0
    try:
        if distributed:
            scorer = _parallel_scorer(args, tokenizer)
        elif args.checkpoint:
            scorer = megatron_scorer(args.checkpoint, tokenizer, args.batch_tokens)
        else:
            scorer = hf_scorer(args.hf, tokenizer, args.batch_tokens)
        report = evaluation.run(scorer, model=str(args.checkpoint or args.hf),
                                progress_factory=lambda n, desc, unit: tqdm(
                                    total=n, unit=unit, desc=desc, disable=args.quiet or not rank0))
    finally:
        shutdown()
    if not rank0:
        return 0
    print(report.table())  # a split other than the reference's is said, not hidden
    write = write_report if args.overwrite else write_new_report  # lm-eval's: one per evaluation
    results, samples = write(report, Path(args.out))
    print(f"results: {shown(results)}\nsamples: {shown(samples)}")
    return 0


def _check_out(out: str) -> None:
    """Refuse an ``--out`` the results could not be written to: a file, a path under a file, a
    directory (or, when it does not exist yet, its nearest existing parent) this process cannot
    create files in. Creates nothing."""
    import tempfile

    from megasmol.config.typed import ConfigError
    from megasmol.utils.fs import existing_ancestor

    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out}: is a file; results go to a directory")
    probe = existing_ancestor(path)
    if not probe.is_dir():
        raise ConfigError(f"--out {out}: {probe} is a file, so no directory can be made under it; "
                          "choose another --out")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write in {probe} ({exc.strerror}); "
                          "choose another --out") from None


def cmd_eval_list(args) -> int:
    from megasmol.eval.tasks.catalog import catalog

    print(catalog(), end="")
    return 0


def _parallel_scorer(args, tokenizer):
    """The checkpoint's model split over the torchrun job (TP x PP x CP, DP for the rest)."""
    from megasmol.config.parallel import ParallelLayout
    from megasmol.eval.scoring.parallel_scorer import PipelineScorer
    from megasmol.model.load import load_checkpoint_model

    layout = ParallelLayout(tensor_parallel=args.tensor_parallel,
                            pipeline_parallel=args.pipeline_parallel,
                            context_parallel=args.context_parallel)
    model, spec, _ = load_checkpoint_model(args.checkpoint, layout=layout)
    return PipelineScorer(model, model, micro_batch_size=args.micro_batch_size,
                          max_length=spec.max_position_embeddings, vocab_size=spec.vocab_size,
                          tokenizer=tokenizer, name=str(args.checkpoint))


def add_eval_parser(sub) -> None:
    from megasmol.eval.tasks.embedded import EMBEDDED
    from megasmol.eval.tasks.registry import suite_names, task_names
    from megasmol.longctx.commands import add_passkey_parser

    p = sub.add_parser(
        "eval", help="evaluations: downstream tasks, passkey retrieval",
        description="Score a megasmol checkpoint (--checkpoint, the Megatron-Core model) or a "
                    "Hugging Face model directory (--hf, transformers): tasks (benchmarks: "
                    "log-likelihood, free generation and code), list (the built-in tasks and "
                    "suites), passkey (long-context retrieval).")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = evals.add_parser(
        "tasks", help="score a model on benchmark tasks (cloze, multiple choice, bits per byte, "
                      "free generation, code)",
        description="Log-likelihood tasks are scored with lm-evaluation-harness's definitions (acc: "
                    "argmax of the summed log-likelihood; acc_norm: divided by the choice's length "
                    "in characters; bits per byte of the gold answer); free-generation tasks "
                    "(gsm8k, demo_arithmetic_gen) decode greedily and score exact match of the "
                    "extracted answer; code tasks (humaneval) run each greedy completion with the "
                    "task's tests in a sandboxed process (pass@1). Under torchrun (--checkpoint, "
                    "--tensor-parallel, --pipeline-parallel, --context-parallel) a model too large "
                    "for one device, or a context too long for one, is scored in that layout. "
                    "Tasks: built-in names ("
                    + ", ".join(task_names() + sorted(EMBEDDED))
                    + "; NAME:SUBSET for one MMLU subject), suites ("
                    + ", ".join(suite_names())
                    + ": each task and their macro average), a task YAML, or a JSONL file of "
                    "{context, choices, gold} items. Built-in tasks read the copies that "
                    "megasmol[evaldata] installs (no network). Writes a table, results.json "
                    "(with each task's data source and split) and samples.jsonl in a new "
                    "OUT/MODEL/TIMESTAMP/ directory (as lm-eval does: no evaluation replaces "
                    "another's), or in OUT itself with --overwrite.")
    add_model_choice(p)
    p.add_argument("--tasks", required=True, help="comma-separated task or suite names, or files")
    p.add_argument("--limit", type=int, help="a fixed, seeded subset of this many examples per task")
    p.add_argument("--num-fewshot", type=int, default=0, help="few-shot examples (default 0)")
    p.add_argument("--seed", type=int, default=1234, help="seed for --limit and few-shot draws")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192,
                   help="padded tokens per forward pass (default 8192)")
    p.add_argument("--out", default="runs/eval",
                   help="output directory (default runs/eval): each evaluation writes a new "
                        "OUT/MODEL/TIMESTAMP/ (MODEL: the model's path, / as __)")
    p.add_argument("--overwrite", action="store_true",
                   help="write OUT/results.json and OUT/samples.jsonl themselves, replacing those "
                        "of an earlier evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="under torchrun: TP size for the model (default 1; DP takes the rest)")
    p.add_argument("--pipeline-parallel", type=int, default=1,
                   help="under torchrun: PP size for the model (default 1)")
    p.add_argument("--context-parallel", type=int, default=1,
                   help="under torchrun: CP size, each sequence split over this many ranks "
                        "(default 1; needs the te or sdpa attention backend)")
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="under torchrun: sequences per micro-batch (default 4)")
    p.set_defaults(func=cmd_eval_tasks)
    p = evals.add_parser("list", help="every built-in task and suite: data source, split, size",
                         description="Prints a Markdown table of the built-in tasks (formulation, "
                                     "the metric suites average, where the data comes from, the "
                                     "split, its size, chance) and of the suites. Reads the "
                                     "shipped copies; never downloads.")
    p.set_defaults(func=cmd_eval_list)
    add_passkey_parser(evals)
