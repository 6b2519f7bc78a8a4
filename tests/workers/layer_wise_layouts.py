"""torchrun worker (4 processes): ``optim.distributed`` for Muon / AdEMAMix (the layer-wise
optimizer) under TP=2 x DP=2 and PP=2 x DP=2.

For each layout and optimizer: two copies of the tiny model from one seed, one stepped by the
sharded optimizer and one by the unsharded one, with the same gradients for three steps; then each
is saved, loaded into a fresh copy, and both the continued and the reloaded copy take a fourth
step with the same gradients (a resume at the optimizer's level). The same save/load/step for the
sharded optimizer over bf16 parameters (fp32 master weights on the owning rank). Writes, from every
rank, one record per case: how far the weights drifted apart, which parameters this rank holds
optimizer states for and how many state values, and whether the reloaded copies stepped bit for
bit; and the sharded fp32 checkpoint loaded by an optimizer with Megatron-Core's ping-pong deal
(how megasmol dealt before), which must step on as the continued copy did. Under TP=2 x DP=2 also
``muon_tp2.record`` (unsharded Muon's TP=2 update against the whole matrix's).

argv: output directory.
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
from tests.workers import muon_tp2  # noqa: E402

LR, WD = 0.01, 0.1
SPEC = tiny_smollm3(tie_embeddings=False, vocab_size=1024, bos_token_id=1, eos_token_id=2,
                    pad_token_id=None)
"""A small vocabulary keeps the checkpoints small; its two matrices are still the largest."""
LAYOUTS = {"tp2": ParallelLayout(tensor_parallel=2), "pp2": ParallelLayout(pipeline_parallel=2)}


def build(name: str, distributed: bool, dtype=torch.float32):
    from megasmol.train.setup import _half_precision

    set_seed(1)
    model = build_model(SPEC, params_dtype=dtype)
    ddp = wrap_ddp(_half_precision(model, dtype), distributed_optimizer=False)
    settings = OptimizerSettings(name=name, distributed=distributed,
                                 muon=MuonSettings(matmul_precision="highest"))
    return model, ddp, build_optimizer(ddp, settings, dtype)


def step(ddp, optimizer, generator) -> None:
    for p in ddp.parameters():
        p.main_grad.copy_(torch.randn(p.shape, generator=generator))
    apply_learning_rate(optimizer, LR, WD)
    assert optimizer.step()[0]


def state_values(optimizer) -> dict[int, int]:
    """{id(param): number of state values} over every chained optimizer."""
    held = {}
    for inner in optimizer.chained_optimizers:
        for param, state in inner.optimizer.state.items():
            held[id(param)] = sum(v.numel() for v in state.values()
                                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return held


def group_settings(optimizer) -> list[str]:
    return [repr(sorted((k, v) for k, v in group.items() if k != "params"))
            for group in optimizer.param_groups]


def ping_pong(weights, ranks: int) -> list[int]:
    """Megatron-Core's own deal (lightest first, ranks 0, 1, 1, 0, ...): a checkpoint written
    with it (megasmol before its greedy deal) must load under megasmol's."""
    loop = list(range(ranks)) + list(range(ranks))[::-1]
    owners = [0] * len(weights)
    for k, index in enumerate(sorted(range(len(weights)), key=lambda i: weights[i])):
        owners[index] = loop[k % len(loop)]
    return owners


def same_states(optimizer, other) -> bool:
    """Every chained optimizer's states, fp32 master weights and group settings are equal."""
    same = group_settings(optimizer) == group_settings(other)
    for inner, copy in zip(optimizer.chained_optimizers, other.chained_optimizers):
        states, others = inner.optimizer.state, copy.optimizer.state
        same &= len(states) == len(others)
        for p, q in zip(inner.optimizer.param_groups, copy.optimizer.param_groups):
            for a, b in zip(p["params"], q["params"]):
                same &= states[a].keys() == others[b].keys() and all(
                    torch.equal(torch.as_tensor(states[a][k]), torch.as_tensor(others[b][k]))
                    for k in states[a])
        masters = zip(getattr(inner, "fp32_from_float16_groups", []),
                      getattr(copy, "fp32_from_float16_groups", []))
        same &= all(torch.equal(a, b) for p, q in masters for a, b in zip(p, q))
    return same


def resumes_bit_for_bit(name, distributed, dtype, trained, root: Path) -> bool:
    """``trained`` (model, ddp, optimizer) saved, loaded into a fresh copy; both take one more
    step with the same gradients: whether weights, states and group settings then agree."""
    from megasmol.ckpt.train_state import load_training_checkpoint, save_training_checkpoint

    model, ddp, optimizer = trained
    save_training_checkpoint(model, optimizer, root, 3, {"train_state": {}})
    fresh_model, fresh_ddp, fresh = build(name, distributed, dtype)
    load_training_checkpoint(fresh_model, fresh, root / "iter_0000003")
    for copy_ddp, copy in ((ddp, optimizer), (fresh_ddp, fresh)):
        step(copy_ddp, copy, torch.Generator().manual_seed(9))
    return (all(torch.equal(a, b) for a, b in zip(ddp.parameters(), fresh_ddp.parameters()))
            and same_states(optimizer, fresh))


def loads_under_another_deal(name, ddp, root: Path) -> dict:
    """The sharded fp32 checkpoint ``root`` (after three steps) loaded by an optimizer dealt
    ping-pong, which then steps as ``ddp`` did from it (to the gradient norm's summation order)."""
    from megasmol.ckpt.train_state import load_training_checkpoint
    from megasmol.train import layer_wise

    greedy = layer_wise.deal
    layer_wise.deal = ping_pong
    try:
        model, other_ddp, other = build(name, True)
    finally:
        layer_wise.deal = greedy
    load_training_checkpoint(model, other, root / "iter_0000003")
    step(other_ddp, other, torch.Generator().manual_seed(9))
    names = {id(p): n for n, p in other_ddp.named_parameters()}
    return {"owned": sorted(names[id(p)] for group in other.param_groups for p in group["params"]),
            "error": max(float((a - b).abs().max() / b.abs().max())
                         for a, b in zip(other_ddp.parameters(), ddp.parameters()))}


def case(layout: str, name: str, out: Path) -> dict:
    from megatron.core import parallel_state

    sharded_model, sharded_ddp, sharded = build(name, distributed=True)
    plain_model, plain_ddp, plain = build(name, distributed=False)
    initial = [p.detach().clone() for p in plain_ddp.parameters()]
    for copy_ddp, copy in ((sharded_ddp, sharded), (plain_ddp, plain)):
        generator = torch.Generator().manual_seed(5 + parallel_state.get_pipeline_model_parallel_rank())
        for _ in range(3):
            step(copy_ddp, copy, generator)
    names = {id(p): n for n, p in sharded_ddp.named_parameters()}
    errors = {n: float((a - b).abs().max() / b.abs().max())
              for (n, a), b in zip(sharded_ddp.named_parameters(), plain_ddp.parameters())}
    held, unsharded = state_values(sharded), state_values(plain)
    root = out / f"ckpt-{layout}-{name}"
    bf16 = build(name, True, torch.bfloat16)
    for _ in range(3):
        step(bf16[1], bf16[2], torch.Generator().manual_seed(7))
    # Each of these takes a fourth step on the copy it saved; the ping-pong copy then steps from
    # the same checkpoint and is compared with the sharded copy's fourth step.
    resumes = {
        "sharded": resumes_bit_for_bit(name, True, torch.float32,
                                       (sharded_model, sharded_ddp, sharded), root / "sharded"),
        "unsharded": resumes_bit_for_bit(name, False, torch.float32,
                                         (plain_model, plain_ddp, plain), root / "unsharded"),
        "sharded_bf16": resumes_bit_for_bit(name, True, torch.bfloat16, bf16, root / "bf16"),
    }
    return {
        "dp_rank": parallel_state.get_data_parallel_rank(),
        "mp_rank": parallel_state.get_model_parallel_group().rank(),
        "errors": errors,
        "owned": sorted(names[id(p)] for group in sharded.param_groups for p in group["params"]),
        "with_state": sorted(names[i] for i in held),
        "state_values": sum(held.values()),
        "unsharded_state_values": sum(unsharded.values()),
        "largest_state_values": max(unsharded.values()),
        "all": sorted(names.values()),
        "changed": float(max((p - q).abs().max() for p, q in zip(sharded_ddp.parameters(), initial))),
        "resumes": resumes,
        "ping_pong": loads_under_another_deal(name, sharded_ddp, root / "sharded"),
    }


def main():
    out = Path(sys.argv[1])
    results = {}
    for layout, parallel in LAYOUTS.items():
        init_parallel(parallel, SPEC)
        for name in ("muon", "ademamix"):
            results[f"{layout}-{name}"] = case(layout, name, out)
        if layout == "tp2":
            results["muon_tp2"] = muon_tp2.record(SPEC)
    (out / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
