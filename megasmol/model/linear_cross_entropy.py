"""A linear cross-entropy that never holds the ``[tokens, vocab]`` logits.

The output layer and the loss in one autograd function, over chunks of positions: the forward
keeps only its inputs and, per position, the log-sum-exp of the logits; the backward recomputes
each chunk's logits from the hidden states and the output weight and accumulates the gradients of
both. Peak memory is one chunk of logits (``chunk_size x vocab/tp``) instead of all of them, for
one more output-layer GEMM per step (the recomputation).

Vocabulary-parallel under tensor parallelism like Megatron-Core's
``tensor_parallel.vocab_parallel_cross_entropy``: each rank holds ``vocab/tp`` rows of the output
weight; the log-sum-exp is combined over the TP group (max, then sum of exponentials,
all-reduced), the target logit is summed from the one rank that holds it, and the hidden
states' gradient is all-reduced by the caller's ``copy_to_tensor_model_parallel_region`` (as
``ColumnParallelLinear`` does for its input).

Per-token loss, as ``SmolGPTModel`` returns it: ``lse - logit[target] + z * lse^2`` (the
z-loss of ``ModelSpec.z_loss_coeff``); a target outside the vocabulary (an ignored position)
contributes no target logit, as in Megatron-Core's.

Why written here rather than taken:

* Megatron-Core's ``cross_entropy_loss_fusion`` (``native``, ``te``) fuses softmax and loss on
  logits already made by the output layer; ``te`` is Transformer Engine's Triton kernel (GPU only).
* ``cut-cross-entropy`` (Apple): Triton kernels (GPU only); its ``torch_compile`` fallback forms
  the logits.
* Liger Kernel's fused linear cross-entropy: Triton kernels (GPU only).

This is plain torch (matmuls and elementwise ops), so it runs on CPU and GPU alike.
"""

from __future__ import annotations

from typing import Optional

import torch

DEFAULT_CHUNK_LOGITS = 1 << 25
"""Logits computed at once (32M: 128 MiB in fp32); a chunk holds this many / vocab positions."""


def default_chunk_size(vocab_partition: int) -> int:
    """Positions per chunk for a ``vocab_partition``-row output weight."""
    return max(1, DEFAULT_CHUNK_LOGITS // vocab_partition)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (Megatron-Core's CE upcasts half-precision logits too)."""
    return torch.promote_types(dtype, torch.float32)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``hidden @ weight.T`` in the model's dtype, upcast to the loss's."""
    return torch.matmul(hidden, weight.t()).to(_loss_dtype(hidden.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, z_loss_coeff, chunk_size, vocab_start, group):
        # hidden [n, h], weight [v_local, h], labels [n] (global ids).
        n = hidden.shape[0]
        v_local = weight.shape[0]
        dtype = _loss_dtype(hidden.dtype)
        local_lse = torch.empty(n, dtype=dtype, device=hidden.device)
        target_logit = torch.zeros(n, dtype=dtype, device=hidden.device)
        local_target = labels - vocab_start
        in_range = (local_target >= 0) & (local_target < v_local)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = _chunk_logits(hidden[start:end], weight)
            local_lse[start:end] = torch.logsumexp(logits, dim=-1)
            rows = in_range[start:end].nonzero().squeeze(-1)
            target_logit[start + rows] = logits[rows, local_target[start:end][rows]]
            del logits
        if _group_size(group) > 1:
            # logsumexp over ranks of each rank's logsumexp = logsumexp over the whole vocabulary.
            global_max = local_lse.clone()
            torch.distributed.all_reduce(global_max, op=torch.distributed.ReduceOp.MAX, group=group)
            sum_exp = torch.exp(local_lse - global_max)
            torch.distributed.all_reduce(sum_exp, group=group)
            lse = global_max + torch.log(sum_exp)
            torch.distributed.all_reduce(target_logit, group=group)
        else:
            lse = local_lse
        loss = lse - target_logit + z_loss_coeff * lse.square()
        ctx.save_for_backward(hidden, weight, local_target, in_range, lse)
        ctx.z_loss_coeff, ctx.chunk_size = z_loss_coeff, chunk_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, local_target, in_range, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, chunk = hidden.shape[0], ctx.chunk_size
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        dtype = lse.dtype
        grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if need_weight else None
        grad_loss = grad_loss.to(dtype)
        # d loss / d logit_j = softmax_j * (1 + 2 z lse) - [j == target]
        scale = grad_loss * (1.0 + 2.0 * ctx.z_loss_coeff * lse)
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            logits = _chunk_logits(hidden[start:end], weight)
            grad_logits = torch.exp_(logits.sub_(lse[start:end, None]))  # softmax, in place
            grad_logits.mul_(scale[start:end, None])
            rows = in_range[start:end].nonzero().squeeze(-1)
            grad_logits[rows, local_target[start:end][rows]] -= grad_loss[start:end][rows]
            grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                torch.matmul(grad_logits, weight, out=grad_hidden[start:end])
            if need_weight:
                grad_weight.addmm_(grad_logits.t().to(dtype), hidden[start:end].to(dtype))
            del logits, grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_coeff: float = 0.0,
    chunk_size: Optional[int] = None,
    tp_group=None,
    vocab_start: int = 0,
) -> torch.Tensor:
    """Per-position loss ``[n]`` of ``hidden`` ``[n, h]`` against ``labels`` ``[n]`` through the
    output ``weight`` ``[vocab/tp, h]`` (this rank's rows, from ``vocab_start``), without ever
    holding the ``[n, vocab]`` logits.

    Under tensor parallelism (``tp_group`` of more than one rank) ``hidden`` must be the same on
    every rank and its gradient is this rank's share: route it through Megatron-Core's
    ``copy_to_tensor_model_parallel_region`` (or the sequence-parallel gather) first, as
    :func:`output_layer_loss` does.
    """
    if chunk_size is None:
        chunk_size = default_chunk_size(weight.shape[0])
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _LinearCrossEntropy.apply(hidden, weight, labels, float(z_loss_coeff), int(chunk_size),
                                     int(vocab_start), tp_group)


def output_layer_loss(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_coeff: float = 0.0,
    sequence_parallel: bool = False,
    tp_group=None,
    chunk_size: Optional[int] = None,
) -> torch.Tensor:
    """The per-token loss ``[b, s]`` of a vocabulary-parallel output layer (Megatron-Core's
    ``ColumnParallelLinear`` without bias, ``weight`` ``[vocab/tp, h]``) on ``hidden_states``
    ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism) with ``labels`` ``[b, s]``: what
    ``GPTModel`` returns with labels, computed by :func:`linear_cross_entropy`."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    tp = _group_size(tp_group)
    if sequence_parallel and tp > 1:
        hidden_states = gather_from_sequence_parallel_region(hidden_states, group=tp_group)
    elif tp > 1:
        hidden_states = copy_to_tensor_model_parallel_region(hidden_states, group=tp_group)
    s, b, h = hidden_states.shape
    rank = torch.distributed.get_rank(tp_group) if tp > 1 else 0
    loss = linear_cross_entropy(
        hidden_states.reshape(s * b, h), weight, labels.t().reshape(s * b),
        z_loss_coeff=z_loss_coeff, chunk_size=chunk_size, tp_group=tp_group if tp > 1 else None,
        vocab_start=rank * weight.shape[0])
    return loss.view(s, b).t()
