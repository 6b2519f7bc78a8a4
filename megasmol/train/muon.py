"""Muon (``optim.name: muon``): orthogonalized momentum on the hidden matrices, AdamW elsewhere.

What Megatron-Core 0.16.1 does (``megatron/core/optimizer/muon.py``), on the optimizers it wraps:

* every 2-D parameter that is not the embedding or the output layer goes to Muon; everything else
  (embedding, output layer, norms, biases) to Megatron-Core's own AdamW with ``optim``'s betas,
  eps and weight-decay groups; the two are chained in one ``ChainedOptimizer`` (one clipping,
  one gradient norm, one checkpoint);
* Muon's step (``OrthogonalizedOptimizer`` of NVIDIA's emerging-optimizers): decoupled weight
  decay ``p -= lr * wd * p``; momentum ``m = lerp(m, g, 1 - mu)``; Nesterov
  ``u = lerp(g, m, mu)`` (else ``u = m``); ``p -= lr * scale * NS(u)``, where NS is the quintic
  Newton-Schulz iteration on ``u / ||u||_F`` and ``scale`` the update-RMS matching of
  ``optim.muon.scale_mode`` times ``optim.muon.extra_scale`` (Moonlight: 0.2 sqrt(max(m, n)), so
  AdamW's learning rate and weight decay carry over);
* the fused QKV matrix is orthogonalized per query/key/value block (``split_qkv``).

Megatron-Core's ``TensorParallelMuon`` cannot be used as shipped: it is written against an older
emerging-optimizers API (``momentum_beta``/``use_nesterov``, ``newton_schulz_tp(mode=)``), and the
only release on PyPI (0.3.0) renamed them, needs Python 3.12 and imports Triton. So the optimizer
below is megasmol's, with the same update and the same coefficients; the parameter split, the
wrappers and the chaining are Megatron-Core's classes.

Tensor parallelism: Muon orthogonalizes the WHOLE matrix, not each TP shard (Megatron-Core's
``muon_tp_mode: duplicated``; its default ``blockwise`` orthogonalizes each shard on its own,
which is a different update). Each TP rank all-gathers the shards of the momentum along the
parameter's ``partition_dim`` (0 for column-parallel, 1 for row-parallel), runs the iteration on
the full matrix (the same on every rank) and keeps its own slice, so the update equals the one a
single process computes. Muon's states are per parameter shard, like the weights.

Megatron-Core refuses Muon with its distributed optimizer (the DDP gradient buffers are laid out
for Adam's element-wise sharding); ``optim.distributed`` shards Muon's and its AdamW's states by
whole parameter with Megatron-Core's layer-wise optimizer instead (``layer_wise.py``), as
Megatron-Core's ``get_megatron_muon_optimizer(layer_wise_distributed_optimizer=True)`` does.
"""

from __future__ import annotations

import torch

from megasmol.config.sections import MuonSettings, OptimizerSettings

QUINTIC_COEFFICIENTS = (
    (4.0848, -6.8946, 2.9270),
    (3.9505, -6.3029, 2.6377),
    (3.7418, -5.5913, 2.3037),
    (2.8769, -3.1427, 1.2046),
    (2.8366, -3.0525, 1.2012),
)
"""(a, b, c) of ``X <- a X + (b A + c A^2) X`` with ``A = X X^T``, one set per iteration, cycled
(emerging-optimizers' ``quintic`` set, which Megatron-Core uses; from modded-nanogpt)."""

MOMENTUM = "momentum_buffer"
STATES = (MOMENTUM,)
"""Muon's per-parameter state tensors (each the parameter's shape)."""


def newton_schulz(x: torch.Tensor, steps: int, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal ``U V^T`` for ``x = U S V^T`` (2-D, fp32 in and out).

    The iteration runs on the wide orientation (rows <= columns) after scaling to Frobenius norm
    1, in the dtype ``torch.get_float32_matmul_precision`` asks for (``medium``: bf16).
    """
    transpose = x.size(0) > x.size(1)
    if transpose:
        x = x.mT
    X = x / x.norm().clamp_min(eps)
    if torch.get_float32_matmul_precision() == "medium":
        X = X.to(torch.bfloat16)
    for i in range(steps):
        a, b, c = QUINTIC_COEFFICIENTS[i % len(QUINTIC_COEFFICIENTS)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    X = X.to(torch.float32)
    return X.mT if transpose else X


def update_scale(rows: int, cols: int, settings: MuonSettings) -> float:
    """The factor the orthogonalized update of a ``rows x cols`` matrix is multiplied by."""
    base = {"spectral": max(rows, cols) ** 0.5,
            "shape_scaling": max(1.0, rows / cols) ** 0.5,
            "unit_rms_norm": (rows / cols) ** 0.5}[settings.scale_mode]
    return base * settings.extra_scale


class Muon(torch.optim.Optimizer):
    """Muon on 2-D (possibly tensor-parallel) matrices; see the module docstring.

    ``tp_group``: the tensor-parallel group; a parameter with ``tensor_model_parallel`` and a
    ``partition_dim`` is a shard of a matrix split over it. ``qkv_split``: rows of one query
    group's query, key and value blocks in the fused QKV weight (parameters marked ``is_qkv``).
    """

    def __init__(self, params, settings: MuonSettings, lr: float = 1.0, weight_decay: float = 0.0,
                 tp_group=None, qkv_split: tuple[int, int, int] | None = None):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay,
                                  "momentum": settings.momentum})
        self.settings = settings
        self.tp_group = tp_group
        self.qkv_split = qkv_split

    def _tp_size(self) -> int:
        if self.tp_group is None or not torch.distributed.is_initialized():
            return 1
        return torch.distributed.get_world_size(self.tp_group)

    def _orthogonalize_matrix(self, u: torch.Tensor, partition_dim: int | None) -> torch.Tensor:
        tp = self._tp_size()
        if partition_dim is not None and tp > 1:
            shards = [torch.empty_like(u) for _ in range(tp)]
            torch.distributed.all_gather(shards, u.contiguous(), group=self.tp_group)
            whole = torch.cat(shards, dim=partition_dim)
            rank = torch.distributed.get_rank(self.tp_group)
            out = self._orthogonalize_matrix(whole, None)
            return out.chunk(tp, dim=partition_dim)[rank]
        rows, cols = u.shape
        return newton_schulz(u, self.settings.ns_steps) * update_scale(rows, cols, self.settings)

    def orthogonalize(self, param: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        partition_dim = None
        if getattr(param, "tensor_model_parallel", False):
            partition_dim = getattr(param, "partition_dim", -1)
            partition_dim = None if partition_dim == -1 else partition_dim
        if self.settings.split_qkv and self.qkv_split and getattr(param, "is_qkv", False):
            rows_per_group = sum(self.qkv_split)
            groups = u.size(0) // rows_per_group
            blocks = torch.split(u.view(groups, rows_per_group, -1), list(self.qkv_split), dim=1)
            done = [self._orthogonalize_matrix(block.reshape(-1, u.size(1)), partition_dim)
                    .view(groups, -1, u.size(1)) for block in blocks]
            return torch.cat(done, dim=1).view_as(u)
        return self._orthogonalize_matrix(u, partition_dim)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        previous = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.settings.matmul_precision)
        try:
            for group in self.param_groups:
                mu = group["momentum"]
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state = self.state[p]
                    if not state:
                        state[MOMENTUM] = torch.zeros_like(p)
                    if group["weight_decay"]:
                        p.mul_(1.0 - group["lr"] * group["weight_decay"])
                    buf = state[MOMENTUM]
                    buf.lerp_(p.grad, 1.0 - mu)
                    u = p.grad.lerp(buf, mu) if self.settings.nesterov else buf
                    p.add_(self.orthogonalize(p, u), alpha=-group["lr"])
        finally:
            torch.set_float32_matmul_precision(previous)


def _init_momentum(optimizer, config=None) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state[p]:
                optimizer.state[p][MOMENTUM] = torch.zeros_like(p)


def is_muon_matrix(param: torch.Tensor) -> bool:
    """Megatron-Core's rule: 2-D and neither the embedding nor the output layer."""
    return param.dim() == 2 and not getattr(param, "is_embedding_or_output_parameter", False)


def build_muon(ddp_model, settings: OptimizerSettings, params_dtype: torch.dtype):
    """Muon on the hidden matrices and Megatron-Core's AdamW on the rest, chained."""
    import dataclasses

    from megatron.core import parallel_state
    from megatron.core.optimizer import ChainedOptimizer, get_megatron_optimizer

    from megasmol.train.layer_wise import Part, layer_wise
    from megasmol.train.megatron_optim import (
        ADAM_STATE_TENSORS,
        megatron_config,
        model_parallel_group,
        trainable_param_groups,
        wrap,
    )
    from megasmol.train.param_groups import weight_decay_overrides

    config = megatron_config(settings, params_dtype, megatron_distributed=False)
    model_config = ddp_model.config
    kv = model_config.kv_channels
    qkv_split = (model_config.num_attention_heads // model_config.num_query_groups * kv, kv, kv)
    trainable = [(name, p) for name, p in ddp_model.named_parameters() if p.requires_grad]
    matrices = [p for _, p in trainable if is_muon_matrix(p)]
    others = [p for _, p in trainable if not is_muon_matrix(p)]
    for name, p in trainable:
        if p.dim() == 2 and "linear_qkv.weight" in name:
            p.is_qkv = True
    # Megatron-Core's own way of building the two halves: freeze one, build the other.
    try:
        for p in others:
            p.requires_grad_(False)
        groups = trainable_param_groups(ddp_model, config, settings)
        muon = Muon(groups, settings.muon, weight_decay=settings.weight_decay,
                    tp_group=parallel_state.get_tensor_model_parallel_group(), qkv_split=qkv_split)
        for p in others:
            p.requires_grad_(True)
        for p in matrices:
            p.requires_grad_(False)
        adam = []
        if others:
            # Sharded: fp32 wrappers, which the layer-wise optimizer replaces after its deal.
            adam_config = dataclasses.replace(config, bf16=False) if settings.distributed else config
            adam = get_megatron_optimizer(adam_config, [ddp_model],
                                          config_overrides=weight_decay_overrides(settings.decay)
                                          ).chained_optimizers
    finally:
        for p in matrices + others:
            p.requires_grad_(True)
    if settings.distributed:
        return layer_wise([Part(muon, _init_momentum, state_tensors=len(STATES))]
                          + [Part(inner.optimizer, inner.init_state_fn, ADAM_STATE_TENSORS)
                             for inner in adam], config)
    return ChainedOptimizer([wrap(muon, config, _init_momentum, model_parallel_group())] + adam)
