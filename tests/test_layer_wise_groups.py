"""The layer-wise optimizer (``optim.distributed`` for Muon and AdEMAMix) refuses a layout whose
ranks' parameter groups differ: Megatron-Core 0.16.1's checkpoint code would give one pipeline
stage another's group settings (``megasmol/train/layer_wise.py``)."""

import pytest
import torch

from megasmol.config.sections import OptimizerSettings
from megasmol.config.typed import ConfigError
from megasmol.train.layer_wise import Part, group_settings, require_same_groups


def built_parts(name: str, tie_embeddings: bool) -> list[Part]:
    """The chain's torch optimizers as the real builder makes them, for a tiny model."""
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import set_seed
    from megasmol.train.optimizer import build_optimizer, wrap_ddp
    from tests.specs import tiny_smollm3

    set_seed(1)
    ddp = wrap_ddp(build_model(tiny_smollm3(tie_embeddings=tie_embeddings)), distributed_optimizer=False)
    optimizer = build_optimizer(ddp, OptimizerSettings(name=name, distributed=True), torch.float32)
    return [Part(inner.optimizer, inner.init_state_fn, 1) for inner in optimizer.chained_optimizers]


@pytest.mark.parametrize("name", ["muon", "ademamix"])
def test_groups_compare_by_settings_not_by_parameters(megatron_runtime, name):
    """Two models with other parameters (tied or not: the output layer exists in one only) but the
    same groups pass; the same model with one group's learning-rate multiplier changed on one rank
    (an override that matched there only) is refused, naming both ranks and the group."""
    untied, tied = built_parts(name, False), built_parts(name, True)
    assert sum(len(g["params"]) for p in untied for g in p.optimizer.param_groups) > \
        sum(len(g["params"]) for p in tied for g in p.optimizer.param_groups)
    require_same_groups([("rank 0 (pipeline stage 0)", group_settings(untied)),
                         ("rank 1 (pipeline stage 1)", group_settings(tied))])

    tied[-1].optimizer.param_groups[-1]["lr_mult"] = 0.5
    with pytest.raises(ConfigError) as refused:
        require_same_groups([("rank 0 (pipeline stage 0)", group_settings(untied)),
                             ("rank 1 (pipeline stage 1)", group_settings(tied))])
    message = str(refused.value)
    assert "\n" not in message and message.startswith("optim.distributed: ")
    assert "rank 0 (pipeline stage 0)" in message and "rank 1 (pipeline stage 1)" in message
    group = len(tied[-1].optimizer.param_groups) - 1
    assert f"parameter group {group} " in message and "('lr_mult', 0.5)" in message


def test_a_missing_group_or_part_is_refused():
    """A rank with one group fewer, or one optimizer fewer in the chain, is refused (with another
    number of groups Megatron-Core's per-group collectives would not even pair up)."""
    weight, norm = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    both = torch.optim.AdamW([{"params": [weight], "wd_mult": 1.0}, {"params": [norm], "wd_mult": 0.0}])
    one = torch.optim.AdamW([{"params": [weight], "wd_mult": 1.0}])
    sgd = torch.optim.SGD([{"params": [weight], "wd_mult": 1.0}], lr=0.1)
    full = [Part(both, None, 2)]
    require_same_groups([("a", group_settings(full)), ("b", group_settings([Part(both, None, 2)]))])
    with pytest.raises(ConfigError, match="AdamW has 2 parameter groups on a, 1 on b"):
        require_same_groups([("a", group_settings(full)), ("b", group_settings([Part(one, None, 2)]))])
    with pytest.raises(ConfigError, match=r"optimizers \['AdamW'\] on a, \['AdamW', 'SGD'\] on c"):
        require_same_groups([("a", group_settings(full)), ("b", group_settings(full)),
                             ("c", group_settings(full + [Part(sgd, None, 1)]))])
