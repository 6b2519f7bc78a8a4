"""Forward-only scoring with the output layer at the loss mask's positions only, against the whole
vocabulary at every position (what validation, in-loop and offline scoring and the reference
log-probs did before): ``python bench/scored_positions.py``. smollm3-tiny (64 wide, Llama-3.2's
128,256-token vocabulary, where the output layer is most of the cost), a batch of 8 x 64 tokens
with 8 scored positions per row (a multiple-choice continuation), fp32, one process. Prints the
median time of each over the same batches, their ratio, and the largest difference of the
per-row sums (they must agree)."""

from __future__ import annotations

import statistics
import time

import torch


def main() -> None:
    from megasmol.config.parallel import ParallelLayout
    from megasmol.model.gpt import build_model
    from megasmol.model.spec import load_model_spec
    from megasmol.runtime.distributed import init_parallel

    init_parallel(ParallelLayout())
    torch.manual_seed(0)
    model = build_model(load_model_spec("smollm3-tiny")).eval()
    b, s = 8, 64
    tokens = torch.randint(0, 100_000, (b, s))
    labels = torch.randint(0, 100_000, (b, s))
    mask = torch.zeros(b, s)
    mask[:, 50:58] = 1
    positions = torch.arange(s).expand(b, s).contiguous()
    times = {"whole vocabulary at every position": [], "scored positions only": []}
    sums = {}
    with torch.no_grad():
        for _ in range(7):
            for name, extra in (("whole vocabulary at every position", {}),
                                ("scored positions only", {"loss_positions": mask > 0})):
                started = time.perf_counter()
                out = model(tokens, positions, None, labels=labels, **extra)
                times[name].append(time.perf_counter() - started)
                sums[name] = (out * mask).sum(-1)
    full, scored = (statistics.median(v) for v in times.values())
    for name, values in times.items():
        print(f"{name:<36} {statistics.median(values) * 1000:8.1f} ms (median of {len(values)})")
    difference = (sums["whole vocabulary at every position"] - sums["scored positions only"]).abs().max()
    print(f"speed-up {full / scored:.1f}x; largest per-row difference {difference.item():.2e}")


if __name__ == "__main__":
    main()
