"""Muon under TP=2: the update of each tensor-parallel shard equals the update one process
computes for the whole matrix (Muon orthogonalizes the whole matrix, not each shard).

:func:`record` runs inside ``layer_wise_layouts.py``'s TP=2 x DP=2 layout (one torchrun for
both); run alone, this file is a torchrun worker on TP=2 (argv: the output file)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from megasmol.config.parallel import ParallelLayout  # noqa: E402
from megasmol.config.sections import MuonSettings, OptimizerSettings  # noqa: E402
from megasmol.model.gpt import build_model  # noqa: E402
from megasmol.runtime.distributed import init_parallel, set_seed, shutdown  # noqa: E402
from megasmol.train.muon import Muon  # noqa: E402
from megasmol.train.optimizer import apply_learning_rate, build_optimizer, wrap_ddp  # noqa: E402
from tests.specs import tiny_smollm3  # noqa: E402

LR, WD = 0.02, 0.1


def gather(shard, dim, group):
    parts = [torch.empty_like(shard) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, shard.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def record(spec) -> dict:
    """Under an initialized TP=2 layout: per hidden matrix, the relative error against the whole
    matrix's update, how far the step moved it, and how far it is from each shard's own update."""
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    set_seed(1)
    ddp = wrap_ddp(build_model(spec), distributed_optimizer=False)
    muon = MuonSettings(matmul_precision="highest")
    settings = OptimizerSettings(name="muon", distributed=False, clip_grad=0.0, muon=muon)
    optimizer = build_optimizer(ddp, settings, torch.float32)
    sharded = {name: p for name, p in ddp.named_parameters()
               if p.dim() == 2 and getattr(p, "tensor_model_parallel", False)
               and not getattr(p, "is_embedding_or_output_parameter", False)}
    before = {name: gather(p.detach().clone(), p.partition_dim, tp_group)
              for name, p in sharded.items()}
    grads = {}
    generator = torch.Generator().manual_seed(5)
    for name, p in ddp.named_parameters():
        if name in sharded:
            whole = torch.randn(before[name].shape, generator=generator)
            grads[name] = whole
            rank = parallel_state.get_tensor_model_parallel_rank()
            p.main_grad.copy_(whole.chunk(2, dim=p.partition_dim)[rank])
        else:
            p.main_grad.zero_()
    apply_learning_rate(optimizer, LR, WD)
    optimizer.step()
    errors, changes, blockwise = {}, {}, {}
    for name, p in sharded.items():
        after = gather(p.detach().clone(), p.partition_dim, tp_group)
        whole = torch.nn.Parameter(before[name].clone())
        whole.is_qkv = getattr(p, "is_qkv", False)
        whole.grad = grads[name]
        kv = ddp.config.kv_channels
        reference = Muon([whole], muon, lr=LR, weight_decay=WD, qkv_split=(
            ddp.config.num_attention_heads // ddp.config.num_query_groups * kv, kv, kv))
        reference.step()
        errors[name] = float((after - whole.detach()).abs().max() / whole.detach().abs().max())
        changes[name] = float((after - before[name]).abs().max())
        # What orthogonalizing each shard on its own would give instead (must differ).
        shards = []
        for shard, grad in zip(before[name].chunk(2, dim=p.partition_dim),
                               grads[name].chunk(2, dim=p.partition_dim)):
            piece = torch.nn.Parameter(shard.clone())
            piece.is_qkv, piece.grad = whole.is_qkv, grad.clone()
            Muon([piece], muon, lr=LR, weight_decay=WD, qkv_split=reference.qkv_split).step()
            shards.append(piece.detach())
        blockwise[name] = float((after - torch.cat(shards, dim=p.partition_dim)).abs().max())
    return {"errors": errors, "changes": changes, "blockwise": blockwise}


def main():
    spec = tiny_smollm3()
    init_parallel(ParallelLayout(tensor_parallel=2), spec)
    result = record(spec)
    if torch.distributed.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    main()
