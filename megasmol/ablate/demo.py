"""``megasmol demo --ablation``: a small ablation on the demo corpus, the playbook's loop in
miniature. Two peak learning rates x two seeds of ``smollm3-tiny`` (``examples/tiny/demo.yaml``
shortened), each scored in the loop on the offline demo tasks (50 examples each, 4 times per
run); then ``compare`` prints the table (mean ± std over seeds), judges the tasks by the
playbook's criteria and writes the plots."""

from __future__ import annotations

import time
from pathlib import Path

from megasmol.utils.fs import shown

LEARNING_RATES = (3e-3, 1e-3)
SEEDS = 2


def run_ablation_demo(workdir: Path, steps: int = 60, overrides: list[str] | None = None) -> int:
    from megasmol.ablate.compare import load_comparison
    from megasmol.ablate.grid import Variation, plan_grid
    from megasmol.ablate.launch import run_grid
    from megasmol.ablate.plots import write_plots
    from megasmol.ablate.task_quality import quality_rows, task_quality
    from megasmol.demo import DEMO_CONFIG, corpus
    from megasmol.utils.table import format_table

    started = time.time()
    workdir = Path(workdir).resolve()
    tokens = corpus(workdir, parts=4)
    every = max(1, steps // 4)
    sets = [f"data.root={tokens}", f"training.train_steps={steps}",
            f"schedule.warmup_steps={min(10, max(1, steps // 6))}",
            "schedule.decay_fraction=0.25", "checkpoint.interval=0", "checkpoint.keep_last=1",
            f"eval.interval={every}", "eval.steps=2", f"eval.tasks_interval={every}",
            "eval.tasks_at_checkpoint=false", "eval.tasks_limit=50", "logging.tensorboard=false",
            "eval.tasks=[demo_arithmetic, demo_code]",  # word order needs more than 60 steps
            "logging.progress=false", *(overrides or [])]
    grid = plan_grid(DEMO_CONFIG, [Variation("schedule.lr", list(LEARNING_RATES))],
                     workdir / "ablation", seeds=SEEDS, sets=sets)
    print(f"[2/4] training {len(grid.runs)} runs of {steps} steps (peak LR {LEARNING_RATES[0]:g} "
          f"vs {LEARNING_RATES[1]:g}, {SEEDS} seeds each; logs in each run's train.log)", flush=True)
    outcome = run_grid(grid)
    if outcome.failed:
        print(f"demo --ablation: runs failed: {', '.join(outcome.failed)}")
        return 1
    comparison = load_comparison([r.run_dir for r in grid.runs], baseline=grid.runs[0].group)
    print("[3/4] megasmol compare " + " ".join(r.name for r in grid.runs))
    for rows in (comparison.table_rows(), comparison.metric_rows()):
        print("      " + format_table(rows, left=1).replace("\n", "\n      "))
    quality = task_quality(comparison)
    print("      evaluation-task quality:")
    print("      " + format_table(quality_rows(quality, len(comparison.experiments)),
                                  left=1).replace("\n", "\n      "))
    plots = write_plots(comparison, grid.out / "compare")
    print(f"[4/4] plots in {shown(grid.out / 'compare')}: {', '.join(p.name for p in plots)}")
    print(f"demo --ablation finished in {time.time() - started:.0f}s")
    return 0
