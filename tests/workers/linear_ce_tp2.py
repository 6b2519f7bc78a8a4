"""torchrun worker on TP=2: the vocabulary-parallel chunked cross-entropy vs the plain path."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.runtime.distributed import init_parallel, shutdown  # noqa: E402
from tests.linear_ce_check import function_errors, model_errors  # noqa: E402
from tests.specs import tiny_smollm3  # noqa: E402


def main():
    spec = tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    init_parallel(ParallelLayout(tensor_parallel=2), spec)
    results = {}
    for z in (0.0, 1e-2):
        for in_forward in (True, False):
            results[f"function z={z} in_forward={in_forward}"] = function_errors(
                z, chunk_size=5, in_forward=in_forward)
            results[f"model z={z} in_forward={in_forward}"] = model_errors(spec, z, in_forward)
    if torch.distributed.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
