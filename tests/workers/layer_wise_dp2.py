"""torchrun worker: ``optim.distributed`` for Muon / AdEMAMix (the layer-wise optimizer).

Two copies of the tiny model from one seed: one stepped by the sharded optimizer, one by the
unsharded one, with the same gradients for three steps. Writes, from every rank, how far the
weights drifted apart, which parameters this rank holds optimizer states for, and how many
state values it holds against the unsharded optimizer's.

argv: optimizer name, output directory, tensor-parallel size.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.config.sections import MuonSettings, OptimizerSettings  # noqa: E402
from megasmol.model.gpt import build_model  # noqa: E402
from megasmol.runtime.distributed import init_parallel, set_seed, shutdown  # noqa: E402
from megasmol.train.optimizer import apply_learning_rate, build_optimizer, wrap_ddp  # noqa: E402
from tests.specs import tiny_smollm3  # noqa: E402

LR, WD = 0.01, 0.1


def build(name: str, distributed: bool):
    set_seed(1)
    ddp = wrap_ddp(build_model(tiny_smollm3(tie_embeddings=False)), distributed_optimizer=False)
    settings = OptimizerSettings(name=name, distributed=distributed,
                                 muon=MuonSettings(matmul_precision="highest"))
    return ddp, build_optimizer(ddp, settings, torch.float32)


def state_values(optimizer) -> dict[int, int]:
    """{id(param): number of state values} over every chained optimizer."""
    held = {}
    for inner in optimizer.chained_optimizers:
        for param, state in inner.optimizer.state.items():
            held[id(param)] = sum(v.numel() for v in state.values()
                                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return held


def main():
    from megatron.core import parallel_state

    name, out, tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    init_parallel(ParallelLayout(tensor_parallel=tp), tiny_smollm3())
    sharded_model, sharded = build(name, distributed=True)
    plain_model, plain = build(name, distributed=False)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        for a, b in zip(sharded_model.parameters(), plain_model.parameters()):
            grad = torch.randn(a.shape, generator=generator)
            a.main_grad.copy_(grad)
            b.main_grad.copy_(grad)
        for optimizer in (sharded, plain):
            apply_learning_rate(optimizer, LR, WD)
            assert optimizer.step()[0]
    names = {id(p): n for n, p in sharded_model.named_parameters()}
    errors = {n: float((a - b).abs().max() / b.abs().max())
              for (n, a), b in zip(sharded_model.named_parameters(), plain_model.parameters())}
    held = state_values(sharded)
    owned = {names[id(p)] for group in sharded.param_groups for p in group["params"]}
    result = {
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
        "errors": errors,
        "owned": sorted(owned),
        "with_state": sorted(names[i] for i in held),
        "state_values": sum(held.values()),
        "unsharded_state_values": sum(state_values(plain).values()),
        "all": sorted(names.values()),
        "changed": float(max((p - q).abs().max() for p, q in zip(
            sharded_model.parameters(), build(name, distributed=False)[0].parameters()))),
    }
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
