"""torchrun worker: packed vs unpacked conversation losses under TP=2, PP=2, then CP=2."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.runtime.distributed import init_parallel, shutdown  # noqa: E402
from tests.chat_check import summed_losses  # noqa: E402
from tests.specs import tiny_smollm3  # noqa: E402


def main():
    prefix, out = sys.argv[1], Path(sys.argv[2])
    spec = tiny_smollm3(attention_backend="sdpa")
    results = {}
    for name, layout in (("tp2", ParallelLayout(tensor_parallel=2)),
                         ("pp2", ParallelLayout(pipeline_parallel=2)),
                         ("cp2", ParallelLayout(context_parallel=2))):
        init_parallel(layout, spec)
        results[name] = summed_losses(spec, prefix, out.parent / f"cache-{name}")
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
