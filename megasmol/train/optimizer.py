"""The trainable model: Megatron-Core DDP around this rank's model chunk, and its optimizer
(``optim.name``: AdamW here, Muon in ``muon.py``, AdEMAMix in ``ademamix.py``).

Megatron's DDP keeps gradients in contiguous (fp32) buffers and reduces them across data-parallel
ranks; with ``optim.distributed`` the optimizer states are sharded over those ranks: AdamW's by
Megatron-Core's distributed optimizer (ZeRO-1, ranges of the DDP buffers, which DDP lays out for
it), Muon's and AdEMAMix's by whole parameter (``layer_wise.py``, plain all-reduced buffers).
Learning rate and weight decay are set on the optimizer's parameter groups every step by
:func:`apply_learning_rate` from megasmol's own schedule, honouring each group's ``lr_mult`` and
``wd_mult`` (the weight-decay overrides of ``param_groups.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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

    config = megatron_config(settings, params_dtype, megatron_distributed=settings.distributed)
    return get_megatron_optimizer(config, [ddp_model],
                                  config_overrides=weight_decay_overrides(settings.decay))


@dataclass(frozen=True)
class OptimizerKind:
    """How megasmol builds one ``optim.name``."""

    build: Callable
    """builder(ddp_model, settings, params_dtype) of a Megatron-Core optimizer."""
    megatron_distributed: bool
    """Whether ``optim.distributed`` means Megatron-Core's distributed optimizer, for which DDP
    lays out its gradient buffers (else the layer-wise one, on plain all-reduced buffers)."""


OPTIMIZERS = {"adamw": OptimizerKind(build_adamw, megatron_distributed=True),
              "muon": OptimizerKind(build_muon, megatron_distributed=False),
              "ademamix": OptimizerKind(build_ademamix, megatron_distributed=False)}
"""``optim.name`` -> how it is built."""


def ddp_distributed_optimizer(settings: OptimizerSettings) -> bool:
    """``wrap_ddp``'s ``distributed_optimizer`` for ``settings``."""
    return settings.distributed and OPTIMIZERS[settings.name].megatron_distributed


def build_optimizer(ddp_model, settings: OptimizerSettings, params_dtype: torch.dtype):
    """The optimizer ``optim.name`` names, with megasmol's weight-decay groups."""
    return OPTIMIZERS[settings.name].build(ddp_model, settings, params_dtype)


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
