"""torchrun worker: load a checkpoint under TP=a, PP=b and save it again from that layout.

Arguments: ``CHECKPOINT OUT TP PP``, repeated for several jobs in one launch."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from megasmol.ckpt.checkpoint import read_metadata, save_checkpoint  # noqa: E402
from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.model.load import load_checkpoint_model  # noqa: E402
from megasmol.runtime.distributed import shutdown  # noqa: E402


def resave(checkpoint: str, out: str, tp: int, pp: int) -> None:
    layout = ParallelLayout(tensor_parallel=tp, pipeline_parallel=pp)
    model, spec, meta = load_checkpoint_model(checkpoint, layout=layout)
    meta = {k: v for k, v in read_metadata(checkpoint).items() if k not in ("format", "step")}
    meta["written_with"] = {"tensor_parallel": tp, "pipeline_parallel": pp}
    save_checkpoint(model, out, 3, meta)


def main():
    args = sys.argv[1:]
    for start in range(0, len(args), 4):
        checkpoint, out, tp, pp = args[start:start + 4]
        resave(checkpoint, out, int(tp), int(pp))
    shutdown()


if __name__ == "__main__":
    main()
