"""torchrun worker: load a checkpoint under TP=2 and save the gathered logits (rank 0)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from megasmol.ckpt.checkpoint import load_model_weights, read_metadata  # noqa: E402
from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.model.gpt import build_model  # noqa: E402
from megasmol.model.spec import model_spec_from_dict  # noqa: E402
from megasmol.runtime.distributed import init_parallel, shutdown  # noqa: E402


def main():
    checkpoint, ids_file, out_file = sys.argv[1:4]
    spec = model_spec_from_dict(read_metadata(checkpoint)["model_spec"])
    init_parallel(ParallelLayout(tensor_parallel=2), spec)
    model = build_model(spec, initialize=False)
    load_model_weights(model, checkpoint)
    model.eval()
    ids = torch.load(ids_file)
    positions = torch.arange(ids.shape[1]).unsqueeze(0).expand_as(ids)
    with torch.no_grad():
        local = model(ids, positions, None)
    full = tensor_parallel.gather_from_tensor_model_parallel_region(local)
    if torch.distributed.get_rank() == 0:
        torch.save(full, out_file)
    shutdown()


if __name__ == "__main__":
    main()
