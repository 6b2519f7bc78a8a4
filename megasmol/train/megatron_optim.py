"""What every optimizer shares on Megatron-Core: its ``OptimizerConfig``, its parameter groups, and
the wrapper that gives a plain torch optimizer Megatron's gradient handling.

Megatron-Core's wrappers (``FP32Optimizer``, or ``Float16OptimizerWithFloat16Params`` with fp32
master weights for bf16 models) take any ``torch.optim.Optimizer``: they copy the DDP's main
gradients in, clip by the global norm (reduced over the model-parallel group), step, copy bf16
weights back, and build the sharded checkpoint state from whatever per-parameter states the inner
optimizer keeps. Only the distributed optimizer is tied to Adam's two states; Muon and
AdEMAMix shard theirs with the layer-wise one instead (``layer_wise.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megasmol.config.sections import OptimizerSettings
from megasmol.train.param_groups import weight_decay_overrides

ADAM_STATE_TENSORS = 2
"""Parameter-sized states of Megatron-Core's Adam(W) per parameter (``exp_avg``, ``exp_avg_sq``)."""


def megatron_config(settings: OptimizerSettings, params_dtype: torch.dtype,
                    megatron_distributed: bool):
    """Megatron-Core's ``OptimizerConfig`` for ``settings`` (Adam's fields; ``lr`` a placeholder:
    ``apply_learning_rate`` sets the real value before every step). ``megatron_distributed``:
    Megatron-Core's own distributed optimizer (AdamW's ``optim.distributed``)."""
    from megatron.core.optimizer import OptimizerConfig

    return OptimizerConfig(
        optimizer="adam",
        lr=1.0,
        min_lr=0.0,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.beta1,
        adam_beta2=settings.beta2,
        adam_eps=settings.eps,
        clip_grad=settings.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        fp16=False,
        params_dtype=params_dtype,
        use_distributed_optimizer=megatron_distributed,
    )


def trainable_param_groups(ddp_model, config, settings: OptimizerSettings) -> list[dict]:
    """Megatron-Core's parameter groups (with megasmol's ``wd_mult``/``lr_mult`` overrides) for
    the parameters that require a gradient, as ``get_megatron_optimizer`` builds them."""
    from megatron.core.optimizer import _get_param_groups

    return _get_param_groups([ddp_model], config, weight_decay_overrides(settings.decay))


def wrap(torch_optimizer, config, init_state_fn: Callable, grad_stats_group):
    """``torch_optimizer`` inside Megatron-Core's fp32 or bf16 (fp32 master weights) wrapper.

    ``init_state_fn(optimizer, config)`` gives every parameter its (zero) states: a checkpoint
    load asks for them before the first step. ``grad_stats_group``: the group the gradient norm
    is reduced over (the model-parallel group, as ``get_megatron_optimizer`` sets it).
    """
    from megatron.core import parallel_state
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    if config.bf16:
        wrapped = Float16OptimizerWithFloat16Params(torch_optimizer, config, None, init_state_fn)
    else:
        wrapped = FP32Optimizer(torch_optimizer, config, init_state_fn)
    wrapped.grad_stats_parallel_group = grad_stats_group
    wrapped.tp_group = parallel_state.get_tensor_model_parallel_group()
    return wrapped


def model_parallel_group():
    from megatron.core import parallel_state

    return parallel_state.get_model_parallel_group()

