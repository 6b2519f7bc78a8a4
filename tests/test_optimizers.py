"""``optim.name``: AdamW, Muon and AdEMAMix through Megatron-Core's optimizer wrappers.

Muon's update equals the reference algorithm written here from its definition; under TP=2 each
shard's update equals one process's update of the whole matrix; AdEMAMix's update equals the
library's. With their states sharded over DP=2 (``optim.distributed``: the layer-wise optimizer),
under TP=2 and under PP=2, the weights equal the unsharded optimizer's, each rank holds the states
of the parameters it owns and no others, the ranks' shares are balanced, and a saved optimizer
(sharded or not, fp32 or bf16) steps on bit for bit after loading; a bf16 Muon run on DP=2 trains
and resumes bit for bit. Training, resuming, branching and averaging single-process runs:
``test_optimizer_branches.py``.
"""

import math
from pathlib import Path

import pytest
import torch

from megasmol.config.run import load_run_config
from megasmol.config.sections import ConfigError, MuonSettings, OptimizerSettings
from tests.conftest import run_torchrun
from tests.train_fixtures import resumed_from, step_losses, torchrun_train, write_training_run

WORKERS = Path(__file__).parent / "workers"

# Keller Jordan's quintic Newton-Schulz coefficients as emerging-optimizers / Megatron-Core cycle them.
COEFFICIENTS = [(4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)]


def reference_orthogonalize(g: torch.Tensor, steps: int) -> torch.Tensor:
    """X0 = G / ||G||_F; X <- a X + b (X X^T) X + c (X X^T)^2 X on the wide side (float64)."""
    x = g.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm()
    for k in range(steps):
        a, b, c = COEFFICIENTS[k % 5]
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(24, 40), (48, 16)])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_update_equals_the_reference_algorithm(shape, nesterov):
    from megasmol.train.muon import Muon

    settings = MuonSettings(nesterov=nesterov, matmul_precision="highest")
    lr, wd, mu = 0.02, 0.1, settings.momentum
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(shape, generator=generator)
    param = torch.nn.Parameter(weight.clone())
    optimizer = Muon([param], settings, lr=lr, weight_decay=wd)
    expected, momentum = weight.double(), torch.zeros(shape, dtype=torch.float64)
    for _ in range(3):
        grad = torch.randn(shape, generator=generator)
        param.grad = grad.clone()
        optimizer.step()
        momentum = mu * momentum + (1 - mu) * grad.double()
        direction = (1 - mu) * grad.double() + mu * momentum if nesterov else momentum
        scale = 0.2 * max(shape) ** 0.5  # Moonlight's update-RMS matching
        expected = expected * (1 - lr * wd) - lr * scale * reference_orthogonalize(direction, 5)
        assert torch.allclose(param.detach().double(), expected, rtol=1e-5, atol=1e-6)
    # The update is not the gradient step: orthogonalized directions move every singular value.
    assert (param.detach().double() - weight.double()).abs().max() > 0.01


def test_muon_takes_hidden_matrices_and_adamw_the_rest(megatron_runtime):
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import set_seed
    from megasmol.train.muon import Muon
    from megasmol.train.optimizer import build_optimizer, wrap_ddp
    from tests.specs import tiny_smollm3

    set_seed(1)
    ddp = wrap_ddp(build_model(tiny_smollm3(tie_embeddings=False)), distributed_optimizer=False)
    optimizer = build_optimizer(ddp, OptimizerSettings(name="muon", distributed=False),
                                torch.float32)
    names = {id(p): n.removeprefix("module.") for n, p in ddp.named_parameters()}
    by_kind = {}
    for inner in optimizer.chained_optimizers:
        kind = "muon" if isinstance(inner.optimizer, Muon) else "adamw"
        assert kind == "muon" or isinstance(inner.optimizer, torch.optim.AdamW)
        for group in inner.optimizer.param_groups:
            by_kind.setdefault(kind, set()).update(names[id(p)] for p in group["params"])
    assert "decoder.layers.0.self_attention.linear_qkv.weight" in by_kind["muon"]
    assert "decoder.layers.1.mlp.linear_fc2.weight" in by_kind["muon"]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight",
                 "decoder.final_layernorm.weight"):
        assert name in by_kind["adamw"]
    assert all(p.dim() == 2 for n, p in ddp.named_parameters()
               if n.removeprefix("module.") in by_kind["muon"])
    assert by_kind["muon"] | by_kind["adamw"] == set(names.values())
    assert not by_kind["muon"] & by_kind["adamw"]


def test_ademamix_update_equals_the_library(megatron_runtime):
    from pytorch_optimizer import AdEMAMix

    from megasmol.config.sections import AdEMAMixSettings
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import set_seed
    from megasmol.train.optimizer import apply_learning_rate, build_optimizer, wrap_ddp
    from tests.specs import tiny_smollm3

    set_seed(2)
    ddp = wrap_ddp(build_model(tiny_smollm3()), distributed_optimizer=False)
    settings = OptimizerSettings(name="ademamix", distributed=False, clip_grad=0.0,
                                 ademamix=AdEMAMixSettings(warmup_steps=4))
    optimizer = build_optimizer(ddp, settings, torch.float32)
    params = [p for p in ddp.parameters() if p.requires_grad]
    copies = {id(p): torch.nn.Parameter(p.detach().clone()) for p in params}
    wd_mult = {id(p): g["wd_mult"] for g in optimizer.param_groups for p in g["params"]}
    lr, wd = 3e-3, 0.1
    library = AdEMAMix(
        [{"params": [copies[id(p)] for p in params if wd_mult[id(p)] == m], "weight_decay": wd * m}
         for m in sorted(set(wd_mult.values()))],
        lr=lr, betas=(0.9, 0.95, 0.9999), weight_decouple=True, alpha=5.0, t_alpha_beta3=4,
        eps=1e-8)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        for p in params:
            grad = torch.randn(p.shape, generator=generator)
            p.main_grad.copy_(grad)
            copies[id(p)].grad = grad.clone()
        apply_learning_rate(optimizer, lr, wd)
        optimizer.step()
        library.step()
        for p in params:
            assert torch.equal(p.detach(), copies[id(p)].detach())
    assert len({0.0, 1.0} & set(wd_mult.values())) == 2  # both decay groups were exercised


def test_optimizer_fields_are_checked(tmp_path):
    config = write_training_run(tmp_path, steps=20)
    assert load_run_config(config).optim.name == "adamw"
    assert load_run_config(config, ["optim.name=muon"]).optim.distributed  # layer-wise sharding
    with pytest.raises(ConfigError, match=r"optim\.name"):
        load_run_config(config, ["optim.name=lion"])
    with pytest.raises(ConfigError, match=r"optim\.muon\.ns_steps"):
        load_run_config(config, ["optim.distributed=false", "optim.name=muon",
                                 "optim.muon.ns_steps=0"])
    with pytest.raises(ConfigError, match=r"optim\.ademamix\.beta3"):
        load_run_config(config, ["optim.ademamix.beta3=1.0"])
    ok = load_run_config(config, ["optim.name=muon", "optim.distributed=false",
                                  "optim.muon.momentum=0.9"])
    assert ok.optim.muon.momentum == 0.9


def test_muon_tp2_shards_update_as_the_whole_matrix(layouts):
    result = layouts[0]["muon_tp2"]
    assert layouts[2]["muon_tp2"] == result  # the other data-parallel replica, the same
    assert len(result["errors"]) >= 8  # qkv, proj, fc1, fc2 of each layer
    for name, error in result["errors"].items():
        assert error < 1e-5, name
        assert result["changes"][name] > 1e-3, name
        # Orthogonalizing each shard alone is a different update: the test can tell.
        assert result["blockwise"][name] > 1e-3, name


def test_the_deal_gives_the_heaviest_first_to_the_least_loaded_rank():
    from megasmol.train.layer_wise import deal

    # Two vocabulary-sized matrices and smaller ones, as in a small model: one of each per rank.
    weights = [5, 100, 7, 100, 3, 40, 40, 9]
    owners = deal(weights, 2)
    assert owners[1] != owners[3]
    loads = [sum(w for w, o in zip(weights, owners) if o == r) for r in (0, 1)]
    assert loads == [152, 152]
    assert owners == deal(weights, 2)  # deterministic: every rank computes the same deal
    assert deal([4, 4, 4], 2) == [0, 1, 0]  # ties: the earlier item, the lower rank
    assert sorted(set(deal(weights, 3))) == [0, 1, 2]
    three = deal(weights, 3)
    spread = [sum(w for w, o in zip(weights, three) if o == r) for r in range(3)]
    assert max(spread) - min(spread) <= max(weights)


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The layer-wise worker's records (TP=2 x DP=2 and PP=2 x DP=2; Muon and AdEMAMix)."""
    import json

    out = tmp_path_factory.mktemp("layer_wise")
    run_torchrun([str(WORKERS / "layer_wise_layouts.py"), str(out)], nproc=4)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(4)]


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", ["muon", "ademamix"])
def test_distributed_states_are_sharded_by_parameter(layouts, layout, name):
    """``optim.distributed`` (layer-wise): the same weights as the unsharded optimizer, each
    parameter's states on exactly one data-parallel rank (the same one for every TP rank), the
    ranks' state memory balanced to within one parameter."""
    ranks = [rank[f"{layout}-{name}"] for rank in layouts]
    for rank in ranks:
        assert max(rank["errors"].values()) < 1e-6, rank["errors"]  # gradient-norm order only
        assert rank["changed"] > 1e-3  # the steps moved the weights
        assert rank["with_state"] == rank["owned"]  # states for owned parameters, and only those
        assert 0 < rank["state_values"] < rank["unsharded_state_values"]
    for mp_rank in (0, 1):
        replicas = [r for r in ranks if r["mp_rank"] == mp_rank]
        owned = [set(r["owned"]) for r in replicas]
        assert not owned[0] & owned[1]
        assert owned[0] | owned[1] == set(replicas[0]["all"])
        assert sum(r["state_values"] for r in replicas) == replicas[0]["unsharded_state_values"]
        # Balanced: the states of the two replicas differ by at most the largest parameter's.
        difference = abs(replicas[0]["state_values"] - replicas[1]["state_values"])
        assert difference <= replicas[0]["largest_state_values"], difference
    if layout == "tp2":
        for dp_rank in (0, 1):
            assert len({tuple(r["owned"]) for r in ranks if r["dp_rank"] == dp_rank}) == 1


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
@pytest.mark.parametrize("name", ["muon", "ademamix"])
def test_a_saved_optimizer_steps_on_bit_for_bit_after_loading(layouts, layout, name):
    """Saved after three steps and loaded into a fresh copy, the optimizer's next step equals the
    uninterrupted one's (weights, states, fp32 master weights, group settings): sharded and
    unsharded in fp32, and sharded over bf16 parameters; and a checkpoint written under one deal
    loads under another."""
    ranks = [rank[f"{layout}-{name}"] for rank in layouts]
    for rank in ranks:
        assert rank["resumes"] == {"sharded": True, "unsharded": True, "sharded_bf16": True}
    # A checkpoint does not depend on the deal: dealt ping-pong (Megatron-Core's way, megasmol's
    # before), another owner loads each state and the next step is the same up to the order in
    # which the gradient norm is summed.
    assert any(rank["ping_pong"]["owned"] != rank["owned"] for rank in ranks)
    for rank in ranks:
        assert rank["ping_pong"]["error"] < 1e-6, rank["ping_pong"]


def test_bf16_sharded_muon_trains_and_resumes_bit_for_bit_on_dp2(tmp_path):
    """bf16 parameters, Muon's and its AdamW's states sharded over DP=2 (fp32 master weights on
    the owning rank): the loss is finite and falls, and a resume repeats the steps bit for bit."""
    steps, sets = 6, ["optim.name=muon", "optim.distributed=true", "training.precision=bf16"]
    sections = {"checkpoint": {"interval": 3, "keep_last": 0}, "eval": {"interval": 0}}
    torchrun_train(write_training_run(tmp_path / "reference", steps=steps, **sections), *sets)
    losses = step_losses(tmp_path / "reference" / "run")
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert (losses[5] + losses[6]) / 2 < (losses[1] + losses[2]) / 2 - 0.05, losses
    resumed = resumed_from(tmp_path / "reference" / "run", "iter_0000003", tmp_path / "resumed",
                           steps=steps, **sections)
    assert "resumed from" in torchrun_train(resumed, *sets).stdout
    assert step_losses(tmp_path / "resumed" / "run") == {s: losses[s] for s in (4, 5, 6)}
