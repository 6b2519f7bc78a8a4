"""The trainable model: Megatron-Core DDP around this rank's model chunk, and its optimizer
(``optim.name``: AdamW here, Muon in ``muon.py``, AdEMAMix in ``ademamix.py``).

Megatron's DDP keeps gradients in contiguous (fp32) buffers and reduces them across data-parallel
ranks; with ``optim.distributed`` the optimizer states are sharded over those ranks (ZeRO-1).
Learning rate and weight decay are set on the optimizer's parameter groups every step by
:func:`apply_learning_rate` from megasmol's own schedule, honouring each group's ``lr_mult`` and
``wd_mult`` (the weight-decay overrides of ``param_groups.py``).
"""

from __future__ import annotations

import torch

from megasmol.config.sections import OptimizerSettings
from megasmol.train.ademamix import build_ademamix
from megasmol.train.megatron_optim import megatron_config
from megasmol.train.muon import build_muon
from megasmol.train.param_groups import weight_decay_overrides


def wrap_ddp(model, distributed_optimizer: bool):
    """Megatron-Core DistributedDataParallel around ``model`` (gradients reduced in fp32)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,  # the loop checks (local_gradients_finite) and skips the step
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_adamw(ddp_model, settings: OptimizerSettings, params_dtype: torch.dtype):
    """Megatron-Core's AdamW (distributed when asked) with megasmol's weight-decay groups."""
    from megatron.core.optimizer import get_megatron_optimizer

    return get_megatron_optimizer(megatron_config(settings, params_dtype), [ddp_model],
                                  config_overrides=weight_decay_overrides(settings.decay))


OPTIMIZERS = {"adamw": build_adamw, "muon": build_muon, "ademamix": build_ademamix}
"""``optim.name`` -> builder(ddp_model, settings, params_dtype) of a Megatron-Core optimizer."""


def build_optimizer(ddp_model, settings: OptimizerSettings, params_dtype: torch.dtype):
    """The optimizer ``optim.name`` names, with megasmol's weight-decay groups."""
    return OPTIMIZERS[settings.name](ddp_model, settings, params_dtype)


def apply_learning_rate(optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)
        group["weight_decay"] = weight_decay * group.get("wd_mult", 1.0)


def local_gradients_finite(ddp_model) -> bool:
    """Whether every value in this rank's gradient buffers is finite (after the reduction).

    Checked before the optimizer step, because neither Megatron-Core's fp32 nor its bf16
    optimizer (no loss scaler) checks for inf/NaN itself. Each rank sees its own buffers: reduced
    gradients where it owns them, its local ones elsewhere; a non-finite value anywhere makes the
    reduced gradient non-finite too, so "any rank saw one" (the flag in the step's all-reduce)
    is exactly "the global gradient is not finite".
    """
    buffers = list(getattr(ddp_model, "buffers", [])) + list(
        getattr(ddp_model, "expert_parallel_buffers", []))
    return all(bool(torch.isfinite(buffer.grad_data).all()) for buffer in buffers)
