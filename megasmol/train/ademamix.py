"""AdEMAMix (``optim.name: ademamix``, Pagliardini et al., 2024), from the ``pytorch-optimizer``
library (``pytorch_optimizer.AdEMAMix``), inside Megatron-Core's fp32 / bf16 optimizer wrapper.

The update is AdamW's plus a slow gradient EMA: ``m1 = lerp(m1, g, 1 - b1)``,
``m2 = lerp(m2, g^2, 1 - b2)``, ``m3 = lerp(m3, g, 1 - b3)``,
``p -= lr * (m1 / bc1 + alpha * m3) / (sqrt(m2 / bc2) + eps)`` with decoupled weight decay
``p -= lr * wd * p``. With ``optim.ademamix.warmup_steps`` T, alpha rises linearly to its value
and beta3 from beta1 to its value over T steps (the library's ``t_alpha_beta3``).

All parameters (embeddings and norms included, with megasmol's weight-decay groups) use it.
Megatron-Core's distributed optimizer only carries Adam's two states, so ``optim.distributed``
shards AdEMAMix's three by parameter with the layer-wise optimizer instead (``layer_wise.py``).
"""

from __future__ import annotations

import torch

from megasmol.config.sections import OptimizerSettings
from megasmol.config.typed import ConfigError

STATES = ("exp_avg", "exp_avg_sq", "exp_avg_slow")
"""The library's per-parameter state tensors (each the parameter's shape)."""


def _init_states(optimizer, config=None) -> None:
    """The library's lazy states, made before a checkpoint load as its first step would."""
    for group in optimizer.param_groups:
        group.setdefault("step", 0)
        for p in group["params"]:
            state = optimizer.state[p]
            if not state:
                for key in STATES:
                    state[key] = torch.zeros_like(p)


def library_optimizer(params, settings: OptimizerSettings):
    """The library's AdEMAMix with ``settings`` (decoupled weight decay, AdamW's)."""
    try:
        from pytorch_optimizer import AdEMAMix
    except ImportError as exc:
        raise ConfigError("optim.name: ademamix needs the pytorch-optimizer package "
                          "(pip install 'megasmol[ademamix]')") from exc
    ade = settings.ademamix
    return AdEMAMix(params, lr=1.0, betas=(settings.beta1, settings.beta2, ade.beta3),
                    weight_decay=settings.weight_decay, weight_decouple=True, alpha=ade.alpha,
                    t_alpha_beta3=ade.warmup_steps or None, eps=settings.eps)


def build_ademamix(ddp_model, settings: OptimizerSettings, params_dtype: torch.dtype):
    from megatron.core.optimizer import ChainedOptimizer

    from megasmol.train.layer_wise import Part, layer_wise
    from megasmol.train.megatron_optim import (
        megatron_config,
        model_parallel_group,
        trainable_param_groups,
        wrap,
    )

    config = megatron_config(settings, params_dtype, megatron_distributed=False)
    groups = trainable_param_groups(ddp_model, config, settings)
    inner = library_optimizer(groups, settings)
    if settings.distributed:
        return layer_wise([Part(inner, _init_states, state_tensors=len(STATES))], config)
    return ChainedOptimizer([wrap(inner, config, _init_states, model_parallel_group())])
