"""``megasmol ablate``, ``compare`` and ``average``: parse, call one function, print."""

from __future__ import annotations

import json
from pathlib import Path

from megasmol.config.run import cli_override
from megasmol.utils.argtypes import input_path
from megasmol.utils.fs import shown


def cmd_average(args) -> int:
    from megasmol.ckpt.weights import check_weights

    check_weights(args.weights, len(args.checkpoints), normalize=not args.no_normalize)  # before torch
    from megasmol.ckpt.average import average_checkpoints
    from megasmol.runtime.distributed import shutdown

    try:
        report = average_checkpoints(args.checkpoints, args.out, weights=args.weights,
                                     normalize=not args.no_normalize, progress=not args.quiet)
    finally:
        shutdown()
    for path, weight, step in zip(report.inputs, report.weights, report.steps):
        print(f"  {weight:>8.4f}  {shown(path)} (step {step})")
    print(f"wrote {shown(report.path)}: {report.describe()}, {report.tensors} tensors, weights only; "
          f"{shown(report.path.parent / 'latest')} names it")
    return 0


def cmd_ablate(args) -> int:
    from megasmol.ablate.grid import params_table, parse_vary, plan_grid
    from megasmol.ablate.launch import run_grid, write_launchers
    from megasmol.config.typed import ConfigError
    from megasmol.utils.table import format_table

    if args.run and args.slurm:
        raise ConfigError("give --run or --slurm, not both")
    varies = [parse_vary(v) for v in args.vary]
    grid = plan_grid(args.config, varies, args.out, seeds=args.seeds, match_params=args.match_params,
                     sets=args.set)
    print(f"{len(grid.runs)} runs in {shown(grid.out)} (manifest {shown(grid.out / 'manifest.json')})")
    header, rows = params_table(grid)
    if not args.match_params:
        header, rows = header[:4], [r[:4] for r in rows]
    print(format_table([header] + rows, left=1))
    local, submit = write_launchers(grid, nproc_per_node=args.nproc_per_node)
    if args.slurm:
        print(f"submit the Slurm array with: {submit}")
    if not args.run:
        if not args.slurm:
            print(f"run them here with --run, or: {local}")
        return 0
    outcome = run_grid(grid, nproc_per_node=args.nproc_per_node, show_progress=not args.quiet)
    print(f"trained {len(outcome.trained)}, skipped {len(outcome.skipped)} (finished), "
          f"failed {len(outcome.failed)}" + (f": {', '.join(outcome.failed)}" if outcome.failed else ""))
    print(f"compare them with: megasmol compare {shown(grid.out)}")
    return 1 if outcome.failed else 0


def cmd_compare(args) -> int:
    from megasmol.ablate.compare import default_out, load_comparison, run_directories
    from megasmol.ablate.plots import write_plots
    from megasmol.ablate.task_quality import quality_rows, task_quality
    from megasmol.utils.fs import atomic_write_text
    from megasmol.utils.table import format_table

    runs, notes = run_directories(args.runs)
    for note in notes:
        print(f"note: {note}")
    comparison = load_comparison(runs, baseline=args.baseline)
    out = args.out or default_out(runs)
    print(format_table(comparison.table_rows(), left=1))
    for dotted in args.by:
        print(f"\nruns diverged, by {dotted}")
        print(format_table(comparison.divergence_rows(dotted), left=1))
    if comparison.metrics:
        print("\ndownstream metrics at the last in-loop evaluation")
        print(format_table(comparison.metric_rows(), left=1))
    quality = task_quality(comparison) if comparison.metrics else []
    if quality:
        print("\nevaluation-task quality (the playbook's criteria, from the runs' in-loop evaluations)")
        print(format_table(quality_rows(quality, len(comparison.experiments)), left=1))
    plots = write_plots(comparison, out, x=args.x)
    summary = {
        "baseline": comparison.baseline,
        "experiments": [{"name": e.name, "runs": [str(r.path) for r in e.runs],
                         "diverged": {str(r.path): r.diverged for r in e.runs if r.diverged},
                         **{c: {"mean": s.mean, "std": s.std, "values": s.values}
                            for c, s in sorted(e.columns.items())}} for e in comparison.experiments],
        "task_quality": [{**q.__dict__, "verdict": q.verdict(len(comparison.experiments))}
                         for q in quality],
    }
    atomic_write_text(out / "comparison.json", json.dumps(summary, indent=2, default=str))
    print(f"\nwrote {shown(out / 'comparison.json')} and {len(plots)} plot(s): "
          + ", ".join(p.name for p in plots))
    return 0


def add_ablate_parsers(sub) -> None:
    p = sub.add_parser(
        "ablate", help="a grid of ablation runs from one base config (write, run here, or Slurm)",
        description="Writes one run config per combination of the --vary values (and seed) under "
                    "--out, named after what changed, with a manifest; --run trains them one after "
                    "another here (finished runs are skipped), --slurm writes a Slurm array. "
                    "model.FIELD varies the model spec; any other section.field the run config.")
    p.add_argument("--config", required=True, type=input_path("--config"), help="the base run config YAML")
    p.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                   help="a field and its values, e.g. model.num_kv_heads=1,2,4 (repeatable: the grid "
                        "is every combination)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="change a base config field for every run, e.g. training.train_steps=500")
    p.add_argument("--seeds", type=int, default=1,
                   help="runs per combination with seeds training.seed, +1, ... (default 1)")
    p.add_argument("--match-params", action="store_true",
                   help="give each variant that changes the parameter count the number of layers "
                        "closest to the base model's count (and show the table)")
    p.add_argument("--out", required=True, help="directory for the grid's runs")
    p.add_argument("--run", action="store_true", help="train the runs here, one after another")
    p.add_argument("--slurm", action="store_true", help="write submit.sh (a Slurm array)")
    p.add_argument("--nproc-per-node", type=int, default=1,
                   help="processes per run with --run (torchrun when > 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser(
        "compare", help="compare runs: table, plots, seed noise and evaluation-task quality",
        description="Reads each run directory's metrics.jsonl and run_config.json. Runs that differ "
                    "only by seed are one experiment (mean ± standard deviation, a band in the "
                    "plots). With in-loop downstream evaluations, also judges each task metric "
                    "by the playbook's criteria: monotonicity, seed noise, signal above chance, "
                    "ranking consistency.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", type=input_path("RUN_DIR"),
                   help="run directories, or an ablation grid's --out directory for all its runs")
    p.add_argument("--baseline", help="run directory or experiment name to compare against")
    p.add_argument("--by", action="append", default=[], metavar="FIELD",
                   help="also count the runs that diverged per value of a config field, e.g. "
                        "optim.name (repeatable)")
    p.add_argument("--x", choices=("tokens", "steps"), default="tokens",
                   help="x axis of the plots (default tokens)")
    p.add_argument("--out", type=Path,
                   help="where the plots and comparison.json go (default: <runs' parent>/compare)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "average", help="average or linearly merge checkpoints (any TP/PP layout) into one",
        description="Weighted average of the model weights of several checkpoints of one model "
                    "spec, accumulated in float64 one block at a time; writes an ordinary weights-only "
                    "checkpoint (export-hf, eval, generate and checkpoint.init_from read it). "
                    "Equal weights by default (averaging a WSD stable phase); any weights for a "
                    "linear merge. Written as OUT/avg_iter_S1-S2 (the inputs' steps; for more "
                    "than four, OUT/avgN_iter_MIN-MAX), with OUT/latest naming it: give OUT.")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   type=input_path("--checkpoints"),
                   help="checkpoint roots (their latest), iteration directories or run directories")
    p.add_argument("--weights", nargs="+", type=float, metavar="W",
                   help="one weight per checkpoint, summing to 1 (default: equal)")
    p.add_argument("--no-normalize", action="store_true",
                   help="use --weights as given even when they do not sum to 1")
    p.add_argument("--out", required=True,
                   help="output checkpoint root (new): OUT/avg_iter_... and OUT/latest")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_average)
