"""torchrun worker on TP=2: SDPA vs local attention, and the vocab-parallel z-loss."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.runtime.distributed import init_parallel, shutdown  # noqa: E402
from tests.attention_check import compare  # noqa: E402
from tests.specs import tiny_smollm3  # noqa: E402
from tests.zloss_check import zloss_error  # noqa: E402


def main():
    spec = tiny_smollm3(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    init_parallel(ParallelLayout(tensor_parallel=2), spec)
    results = compare(spec)
    results["zloss_error"] = zloss_error(spec)
    if torch.distributed.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
