"""Weight-decay groups through Megatron-Core's real optimizer: embeddings exempt, norms decayed."""

from megasmol.model.gpt import build_model
from megasmol.runtime.distributed import set_seed
from megasmol.train.param_groups import WeightDecayPolicy, decayed_parameter_names, weight_decay_overrides
from tests.specs import tiny_smollm3


def _optimizer(model, policy):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    config = OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1, adam_beta1=0.9,
                             adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)
    return ddp, get_megatron_optimizer(config, [ddp], config_overrides=weight_decay_overrides(policy))


def _wd_mult_by_name(ddp, optimizer):
    by_param = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            by_param[id(param)] = group["wd_mult"]
    return {name.removeprefix("module."): by_param[id(p)] for name, p in ddp.named_parameters()}


def test_smollm3_policy_groups(megatron_runtime):
    set_seed(1)
    model = build_model(tiny_smollm3(qk_norm=True))
    ddp, optimizer = _optimizer(model, WeightDecayPolicy())
    mults = _wd_mult_by_name(ddp, optimizer)
    assert mults["embedding.word_embeddings.weight"] == 0.0  # tied: also the output layer
    assert "output_layer.weight" not in mults
    assert mults["decoder.layers.0.self_attention.linear_qkv.weight"] == 1.0
    assert mults["decoder.final_layernorm.weight"] == 1.0  # norms decayed, as nanotron did
    assert mults["decoder.layers.0.self_attention.q_layernorm.weight"] == 1.0
    decayed = decayed_parameter_names(model, WeightDecayPolicy())
    assert decayed == {name: mult == 1.0 for name, mult in mults.items()}


def test_untied_output_and_norm_exemption(megatron_runtime):
    set_seed(1)
    model = build_model(tiny_smollm3(tie_embeddings=False))
    policy = WeightDecayPolicy(decay_norms=False)
    ddp, optimizer = _optimizer(model, policy)
    mults = _wd_mult_by_name(ddp, optimizer)
    assert mults["output_layer.weight"] == 0.0
    assert mults["decoder.final_layernorm.weight"] == 0.0
    assert mults["decoder.layers.1.mlp.linear_fc1.weight"] == 1.0
    # Megatron's own default (no overrides) would decay the embedding: the policy matters.
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    default = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-3, weight_decay=0.1),
                                     [ddp])
    assert _wd_mult_by_name(ddp, default)["embedding.word_embeddings.weight"] == 1.0
