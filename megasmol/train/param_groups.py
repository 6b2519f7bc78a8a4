"""Which parameters get weight decay, as Megatron-Core optimizer overrides.

SmolLM3 (AdamW, weight decay 0.1) exempts the token embedding, and with it the tied output
layer, from weight decay; nanotron, which it ran on, still decays RMSNorm weights. Megatron-Core's
default is the reverse on both counts (it decays embeddings and exempts every 1-D parameter), so
the groups are spelled out here and handed to ``get_megatron_optimizer`` as ``config_overrides``.
Megatron-Core marks embedding and output weights with ``is_embedding_or_output_parameter``.
"""

from __future__ import annotations

from megasmol.config.sections import WeightDecayPolicy  # noqa: F401 (re-exported)


def weight_decay_overrides(policy: WeightDecayPolicy) -> dict:
    """``config_overrides`` for ``megatron.core.optimizer.get_megatron_optimizer``."""
    from megatron.core.optimizer.optimizer_config import ParamKey, ParamWithNamePredicate

    no_decay = {"wd_mult": 0.0}
    overrides = {}
    if not policy.decay_embeddings:
        overrides[ParamKey(attr="is_embedding_or_output_parameter")] = no_decay
    if not policy.decay_norms:
        norm = ParamWithNamePredicate(
            name="norm_weight",
            fn=lambda param, name: param.dim() == 1 and not name.endswith(".bias"))
        overrides[ParamKey(with_name_predicate=norm)] = no_decay
    if not policy.decay_biases:
        overrides[ParamKey(name="*.bias")] = no_decay
    return overrides


def decayed_parameter_names(model, policy: WeightDecayPolicy) -> dict[str, bool]:
    """{name: decayed?} for every trainable parameter, as the overrides above decide."""
    overrides = weight_decay_overrides(policy)
    result = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            result[name] = not any(key.matches(param, name) for key in overrides)
    return result
