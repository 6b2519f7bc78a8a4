"""Per-sample fetch time of the staged loader: a 32k-step plan vs a 3.2M-step plan, same data.

    python bench/loader_scaling.py [--global-batch 8] [--seq-length 256] [--samples 20000]

The playbook's second production surprise was a loader whose per-step work grew with the total
number of steps. Here both plans are built over the demo corpus (indices cached on disk, the
build of the long plan timed), then the same number of training samples is fetched from each,
alternating plans in rounds so machine noise hits both alike. Reports mean fetch time per
sample for each plan and their ratio (target: at most 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--samples", type=int, default=20000, help="samples fetched per plan and round")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus
    from megasmol.data.loader import TokenIds, TrainingBatches, build_stage_data
    from megasmol.data.recipe import load_recipe, plan_stages
    from megasmol.model.spec import load_model_spec

    work = Path(tempfile.mkdtemp(prefix="loaderbench-"))
    build_demo_corpus(work / "corpus")
    tokenize_demo_corpus(work / "corpus", show_progress=False)
    recipe = load_recipe("demo")
    token_ids = TokenIds.from_spec(load_model_spec("smollm3-tiny"))
    loaders, build_seconds = {}, {}
    for steps in (32_000, 3_200_000):
        plans = plan_stages(recipe, steps, args.global_batch, args.seq_length)
        # Both plans keep the demo's stage 2 start (step 201), so both span two stages.
        start = time.perf_counter()
        stages = build_stage_data(recipe, plans, token_ids, seed=1, cache_dir=work / "cache",
                                  root=str(work / "corpus" / "tokens"))
        build_seconds[steps] = time.perf_counter() - start
        loaders[steps] = TrainingBatches(stages, args.global_batch)

    rng = np.random.default_rng(0)
    per_sample = {steps: [] for steps in loaders}
    for _ in range(args.rounds):
        for steps, loader in loaders.items():
            dataset = loader.stages[-1].train  # the long stage of each plan
            # Samples spread over the whole stage: late steps must cost what early ones do.
            indices = rng.integers(0, len(dataset), args.samples)
            start = time.perf_counter()
            for index in indices:
                dataset[int(index)]
            per_sample[steps].append((time.perf_counter() - start) / args.samples)
    short, long = (statistics.median(per_sample[s]) for s in (32_000, 3_200_000))
    print(f"global batch {args.global_batch}, sequence {args.seq_length}, {args.samples} samples x "
          f"{args.rounds} rounds per plan, medians")
    for steps in loaders:
        n = len(loaders[steps].stages[-1].train)
        print(f"  {steps:>9,} steps: {n:>12,} samples in the last stage, index build "
              f"{build_seconds[steps]:7.2f} s, fetch "
              f"{statistics.median(per_sample[steps]) * 1e6:7.1f} us/sample")
    print(f"  ratio (3.2M / 32k): {long / short:.3f}")


if __name__ == "__main__":
    main()
