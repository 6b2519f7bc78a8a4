"""A linear cross-entropy that never holds the ``[tokens, vocab]`` logits.

The output layer and the loss in one autograd function, over chunks of positions; peak memory is
one chunk of logits (``chunk_size x vocab/tp``) instead of all of them. Two ways to get the
gradients, chosen by whether the loss's upstream gradient is known in the forward:

* **In the forward** (``loss_weights`` given: the objective's loss is ``c * sum(w_i * loss_i)``
  with ``w`` known before the forward and ``c`` a scalar, as for pretraining and SFT, where ``w``
  is the loss mask and ``c`` the division by the global token count): each chunk's logits are
  made once, turned in place into ``w_i * d loss_i / d logits`` and multiplied into the gradients
  of the hidden states and of the output weight right away; the backward only scales the stored
  gradients by ``c`` (read from the gradient it gets, and checked to be ``c * w``). Three
  ``tokens x hidden x vocab`` matmuls per step, as the plain path, and fewer passes over each
  chunk than the plain path's softmax over all logits. This is the approach of Liger Kernel's
  fused linear cross-entropy.
* **Recomputed in the backward** (no ``loss_weights``: the per-token losses feed a loss that is
  not linear in them, the preference and RL objectives' log-probs): the forward keeps its inputs
  and each position's log-sum-exp; the backward makes each chunk's logits again. One more matmul
  (four instead of three).

**The output weight's gradient goes straight into Megatron-Core DDP's ``main_grad``** (the fp32
gradient buffer DDP preallocates for every parameter, which the plain path adds its gradient to
as well) when the weight has one, instead of into a separate ``vocab/tp x hidden`` gradient
(the largest tensor the step holds besides the logits: 1.05 GB in fp32 at SmolLM3-3B's shape),
as Megatron-Core's ``gradient_accumulation_fusion`` does on GPU. When recomputed in the backward
the upstream gradient is known there: each chunk's contribution is added to ``main_grad``. When
made in the forward the scalar ``c`` is not known yet, so the contributions go into ``main_grad``
in the forward only when the caller declares ``c`` (``known_scale``): the model declares it from
its config, ``c = 1`` under megasmol's training step (Megatron-Core's schedule with
``calculate_per_token_loss`` back-propagates the objective's ``sum(w * loss)`` unscaled; the
division by the global token count comes later, on ``main_grad``, in ``finalize_model_grads``;
no ``grad_scale_func``: megasmol has no loss scaler). The backward checks the ``c`` it gets and
raises a ``RuntimeError`` if it differs, since the contributions cannot be rescaled once summed
into ``main_grad`` with other micro-batches' and, for tied embeddings, the embedding's. Chosen
over the alternatives: recomputing in the backward whenever the weight has ``main_grad`` costs a
fourth matmul (1.4x the gradients-in-forward path's time in ``bench/RESULTS.md``'s first run at
SmolLM3-3B's shape); a separate gradient is the peak this removes; a scratch smaller than the
weight cannot hold a sum over all positions;
and the scalar is fixed by the config in every step megasmol runs, so the check costs nothing.
Without a declared ``c`` (a caller that scales the loss itself) the weight's gradient is held
until the backward, as before, and returned as its ``.grad``.

**Masked positions** (a zero loss weight in the forward, a zero upstream gradient when
recomputing) have zero gradients: the positions are reordered, weighted ones first, so that
their gradient matmuls (recomputing: their logits too) are skipped; the plain path computes them
as zeros. **The chunk**: ``DEFAULT_CHUNK_LOGITS`` logits, or, when the weight's gradient goes into
``main_grad`` (the step then holds no separate gradient), up to ``hidden / 2`` positions
(``MAIN_GRAD_CHUNK_FRACTION``): on a CPU the matmuls of 261-row chunks took about 1.2x the whole
batch's time, those of 1,024-row chunks 1.02-1.05x (``bench/RESULTS.md``).

How DDP is told, as in Megatron-Core's fused path (``LinearWithGradAccumulationAndAsyncCommunication``):
``weight.grad_added_to_main_grad = True``, so DDP's backward hook does not add a ``.grad`` on top.
The autograd function returns None for the weight rather than Megatron-Core's dummy
``[vocab, hidden]`` tensor (which on GPU is a real allocation at the backward's peak); DDP's
hook still runs for the weight (autograd calls the weight's accumulator with no gradient) and
accepts None unless ``overlap_grad_reduce`` is on, which megasmol's ``wrap_ddp`` leaves off.
Tied embeddings on one pipeline stage: the embedding's gradient still arrives as the shared
weight's ``.grad``, and DDP adds it to the same ``main_grad`` because Megatron-Core marks a
weight shared on one stage ``zero_out_wgrad`` (its hook adds ``.grad`` whatever the flag says);
on the last stage of a pipeline the output weight is its own parameter, and
``finalize_model_grads`` sums it with the embedding's across stages, as for the plain path.

Vocabulary-parallel under tensor parallelism like Megatron-Core's
``tensor_parallel.vocab_parallel_cross_entropy``: each rank holds ``vocab/tp`` rows of the output
weight; the maximum and the sum of exponentials are all-reduced over the TP group (per chunk,
before the softmax, when the gradients are made in the forward), and the target logit is summed
from the one rank that holds it. Each rank's hidden-state gradient is its vocabulary shard's
share; the caller's ``copy_to_tensor_model_parallel_region`` (or the sequence-parallel gather)
sums the shares in the backward, as ``ColumnParallelLinear`` does for its input.

Per-token loss, as ``SmolGPTModel`` returns it: ``lse - logit[target] + z * lse^2`` (the
z-loss of ``ModelSpec.z_loss_coeff``); a target outside the vocabulary (an ignored position)
contributes no target logit, as in Megatron-Core's.

Why written here rather than taken (what the registry and Megatron-Core 0.16.1 hold):

* Megatron-Core's ``cross_entropy_loss_fusion`` (``native``: ``fusions/fused_cross_entropy.py``;
  ``te``: Transformer Engine's Triton kernel, GPU only) fuses softmax and loss on logits the
  output layer has already made: it saves passes, not the logits. It is ``training.cross_entropy:
  te``. Megatron-Core has no linear (output layer + loss) cross-entropy.
* ``cut-cross-entropy`` (Apple, 25.1.1): Triton kernels (GPU only); its ``torch_compile``
  fallback forms the logits; no vocabulary parallelism.
* Liger Kernel's ``LigerFusedLinearCrossEntropyLoss`` (0.8.5): gradients in the forward, in
  chunks, with a z-loss (``lse_square_scale``), in Triton kernels (GPU only); its gradients are
  made for a reduced (mean or sum) loss, with the reduction's weights fixed by its own
  ``ignore_index`` rather than by the objective's mask, and it has no vocabulary parallelism.

This is plain torch (matmuls and in-place elementwise ops), so it runs on CPU and GPU alike,
returns the per-token losses megasmol's objectives consume, and is vocabulary-parallel.
"""

from __future__ import annotations

from typing import Optional

import torch

KNOWN_SCALE_RTOL = 1e-6
"""How far the backward's upstream scalar may be from the one declared in the forward (relative)
when the weight's gradient went into ``main_grad`` in the forward."""

DEFAULT_CHUNK_LOGITS = 1 << 25
"""Logits computed at once (32M: 128 MiB in fp32); a chunk holds this many / vocab positions."""

MAIN_GRAD_CHUNK_FRACTION = 0.5
"""When the weight's gradient goes into Megatron-Core DDP's ``main_grad`` (the step holds no
separate ``vocab/tp x hidden`` gradient G), a chunk may hold this fraction of the weight's
elements in logits (``hidden / 2`` positions: 1,024 at SmolLM3-3B's hidden 2,048): the step
then holds G / 2 less than one that makes G, and saves at least the logits and G / 2 against the
plain path. Larger chunks run the matmuls closer to the whole batch's rate on a CPU
(``bench/RESULTS.md``: at 4,096 tokens the matmuls of 261-row chunks took 1.2x plain's time,
those of 1,024-row chunks 1.02-1.05x)."""


def default_chunk_size(vocab_partition: int, hidden: int = 0, into_main_grad: bool = False) -> int:
    """Positions per chunk for a ``vocab_partition x hidden`` output weight: ``DEFAULT_CHUNK_LOGITS``
    logits; when the weight's gradient goes into ``main_grad`` (no separate gradient held), up to
    ``hidden / 2`` positions, a chunk half the weight's size (see ``MAIN_GRAD_CHUNK_FRACTION``)."""
    positions = DEFAULT_CHUNK_LOGITS // vocab_partition
    if into_main_grad:
        positions = max(positions, int(hidden * MAIN_GRAD_CHUNK_FRACTION))
    return max(1, positions)


def _group_size(group) -> int:
    if group is None or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 at least (Megatron-Core's CE upcasts half-precision logits too)."""
    return torch.promote_types(dtype, torch.float32)


class _ChunkBuffers:
    """The one logits buffer every chunk reuses (``[chunk, vocab/tp]`` in the loss's dtype, fp32
    at least) and, when the model's dtype is narrower, one in the model's dtype for the matmuls'
    inputs and outputs: no per-chunk allocation, no ``.to`` copies when already fp32."""

    def __init__(self, chunk_size: int, n: int, hidden: torch.Tensor, weight: torch.Tensor,
                 reordered: bool = False):
        rows = min(chunk_size, n)
        self.chunk_size = chunk_size
        self.model_dtype = hidden.dtype
        self.dtype = _loss_dtype(hidden.dtype)
        self.wide = torch.empty(rows, weight.shape[0], dtype=self.dtype, device=hidden.device)
        self.narrow = (None if self.dtype == self.model_dtype else
                       torch.empty(rows, weight.shape[0], dtype=self.model_dtype, device=hidden.device))
        # Reordered positions (weighted ones first): a chunk's hidden rows gathered, and its
        # hidden-state gradient made here, then scattered ([chunk, hidden] each, small).
        self.rows_in = self.rows_out = None
        if reordered:
            self.rows_in = torch.empty(rows, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
            self.rows_out = torch.empty_like(self.rows_in)

    def chunks(self, hidden: torch.Tensor, weight: torch.Tensor, every: torch.Tensor, count: int):
        """The first ``count`` positions of ``every``, a chunk at a time: for each, its first
        index in ``every``, its positions, its hidden states and its logits (in the buffer)."""
        for start in range(0, count, self.chunk_size):
            end = min(start + self.chunk_size, count)
            positions = every[start:end]
            rows = self.hidden_rows(hidden, positions, start, end)
            yield start, positions, rows, self.logits(rows, weight)

    def hidden_rows(self, hidden: torch.Tensor, positions: torch.Tensor, start: int,
                    end: int) -> torch.Tensor:
        """The chunk's hidden states: a view when the positions are in order, else gathered."""
        if self.rows_in is None:
            return hidden[start:end]
        return torch.index_select(hidden, 0, positions, out=self.rows_in[:end - start])

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``hidden @ weight.T`` into the wide buffer's first ``len(hidden)`` rows."""
        rows = hidden.shape[0]
        out = self.wide[:rows]
        if self.narrow is None:
            return torch.mm(hidden, weight.t(), out=out)
        return out.copy_(torch.mm(hidden, weight.t(), out=self.narrow[:rows]))

    def in_model_dtype(self, grad_logits: torch.Tensor) -> torch.Tensor:
        """``grad_logits`` (the wide buffer's rows) for the hidden-state gradient's matmul."""
        if self.narrow is None:
            return grad_logits
        return self.narrow[:grad_logits.shape[0]].copy_(grad_logits)


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor,
                            hidden: torch.Tensor, alpha: float = 1.0) -> None:
    """``grad_weight += alpha * grad_logits.T @ hidden`` in the accumulator's dtype (fp32 at least)."""
    if hidden.dtype != grad_weight.dtype:
        hidden = hidden.to(grad_weight.dtype)
    grad_weight.addmm_(grad_logits.t(), hidden, alpha=alpha)


def _nonzero_first(values: torch.Tensor) -> tuple[Optional[torch.Tensor], int]:
    """The positions with a nonzero ``values`` first, in order, then the others (None when all are
    nonzero: no reordering), and how many are nonzero. A zero loss weight (a masked position) or
    upstream gradient makes the position's row of the logits' gradient zero: its two gradient
    matmuls are skipped, the plain path's exact zeros kept."""
    zero = values == 0
    active = values.numel() - int(zero.sum())
    if active == values.numel():
        return None, active
    return torch.cat([(~zero).nonzero().squeeze(-1), zero.nonzero().squeeze(-1)]), active


def _weighted_first(values: torch.Tensor, hidden: torch.Tensor, need_hidden: bool):
    """:func:`_nonzero_first`'s order (None: all nonzero) and count, the positions in the order the
    chunks take them, and the hidden states' gradient (zeros where positions are skipped; None when
    not needed)."""
    order, active = _nonzero_first(values)
    every = torch.arange(values.numel(), device=hidden.device) if order is None else order
    grad_hidden = None
    if need_hidden:
        grad_hidden = torch.empty_like(hidden) if order is None else torch.zeros_like(hidden)
    return order, active, every, grad_hidden


def _hidden_grad_into(grad_hidden: torch.Tensor, grad_logits_model: torch.Tensor, weight: torch.Tensor,
                      buffers: _ChunkBuffers, positions: torch.Tensor, start: int) -> None:
    """``grad_logits @ weight`` into the hidden-state gradient's rows of the chunk's positions
    (its first ``len(grad_logits)``): in place when in order, else scattered."""
    rows = grad_logits_model.shape[0]
    if buffers.rows_out is None:
        torch.mm(grad_logits_model, weight, out=grad_hidden[start:start + rows])
    else:
        grad_hidden[positions[:rows]] = torch.mm(grad_logits_model, weight, out=buffers.rows_out[:rows])


def _zero_grad(weight: torch.Tensor, dtype: torch.dtype, needed: bool) -> Optional[torch.Tensor]:
    """A zero accumulator for the weight's gradient in ``dtype`` (None when not ``needed``)."""
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device) if needed else None


def _main_grad(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The output weight's gradient buffer when Megatron-Core's DDP gave it one the weight's
    gradient can be accumulated into (``main_grad``, which DDP preallocates, in the loss's
    dtype: fp32, ``grad_reduce_in_fp32``), else None (the gradient is returned as ``.grad``)."""
    main_grad = getattr(weight, "main_grad", None)
    if (main_grad is None or not hasattr(weight, "grad_added_to_main_grad")
            or main_grad.shape != weight.shape or main_grad.dtype != _loss_dtype(weight.dtype)):
        return None
    return main_grad


def _added_to_main_grad(weight: torch.Tensor) -> None:
    """Mark ``weight``'s gradient as already in its ``main_grad``, as Megatron-Core's
    ``gradient_accumulation_fusion`` does (``LinearWithGradAccumulationAndAsyncCommunication``);
    the autograd function then returns None for it (see the module's docstring)."""
    weight.grad_added_to_main_grad = True


class _RecomputeInBackward(torch.autograd.Function):
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
        buffers = _ChunkBuffers(chunk_size, n, hidden, weight)
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            logits = buffers.logits(hidden[start:end], weight)
            rows = in_range[start:end].nonzero().squeeze(-1)
            target_logit[start + rows] = logits[rows, local_target[start:end][rows]]
            row_max = logits.amax(dim=-1)  # logsumexp in place: the buffer is scratch from here
            local_lse[start:end] = row_max + torch.log(torch.exp_(logits.sub_(row_max[:, None])).sum(dim=-1))
        del buffers
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
        dtype = lse.dtype
        # Straight into Megatron-Core DDP's buffer when it has one: no separate gradient.
        main_grad = _main_grad(weight) if need_weight else None
        grad_weight = main_grad if main_grad is not None else _zero_grad(weight, dtype, need_weight)
        grad_loss = grad_loss.to(dtype)
        # Positions with a zero upstream gradient (masked) have zero gradients: not recomputed.
        order, active, every, grad_hidden = _weighted_first(grad_loss, hidden, need_hidden)
        # d loss / d logit_j = softmax_j * (1 + 2 z lse) - [j == target]
        scale = grad_loss * (1.0 + 2.0 * ctx.z_loss_coeff * lse)
        buffers = _ChunkBuffers(chunk, n, hidden, weight, reordered=order is not None)
        for start, positions, hidden_rows, logits in buffers.chunks(hidden, weight, every, active):
            grad_logits = torch.exp_(logits.sub_(lse[positions, None]))  # softmax, in place
            grad_logits.mul_(scale[positions, None])
            rows = in_range[positions].nonzero().squeeze(-1)
            grad_logits[rows, local_target[positions][rows]] -= grad_loss[positions][rows]
            if need_hidden:
                _hidden_grad_into(grad_hidden, buffers.in_model_dtype(grad_logits), weight, buffers,
                                  positions, start)
            if need_weight:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden_rows)
        del buffers
        if main_grad is not None:
            _added_to_main_grad(weight)
            grad_weight = None
        elif need_weight and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None


class _GradientsInForward(torch.autograd.Function):
    """The loss and, in the same pass over each chunk, its gradients with respect to the hidden
    states and the output weight for an upstream gradient ``c * loss_weights`` (``c`` a scalar
    known only in the backward): three matmuls per chunk, nothing recomputed, all of a chunk's
    elementwise work in place in the one reused chunk buffer, the weight's gradient accumulated
    with ``addmm_`` into one buffer."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, loss_weights, z_loss_coeff, chunk_size, vocab_start, group,
                known_scale):
        n, v_local = hidden.shape[0], weight.shape[0]
        dtype = _loss_dtype(hidden.dtype)
        tp = _group_size(group)
        lse = torch.empty(n, dtype=dtype, device=hidden.device)
        target_logit = torch.zeros(n, dtype=dtype, device=hidden.device)
        local_target = labels - vocab_start
        in_range = (local_target >= 0) & (local_target < v_local)
        weights = loss_weights.to(dtype)
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Weighted positions first: a masked one's gradients are zero, its gradient matmuls skipped.
        order, active, every, grad_hidden = _weighted_first(weights, hidden, need_hidden)
        # The upstream scalar known now (the config's): the weight's gradient goes straight into
        # Megatron-Core DDP's main_grad, already scaled; the backward checks the scalar.
        main_grad = _main_grad(weight) if need_weight and known_scale is not None else None
        weight_alpha = known_scale if main_grad is not None else 1.0
        grad_weight = main_grad if main_grad is not None else _zero_grad(weight, dtype, need_weight)
        buffers = _ChunkBuffers(chunk_size, n, hidden, weight, reordered=order is not None)
        for start, positions, hidden_rows, logits in buffers.chunks(hidden, weight, every, n):
            rows = in_range[positions].nonzero().squeeze(-1)
            cols = local_target[positions][rows]
            target_logit[positions[rows]] = logits[rows, cols]
            # softmax over the whole vocabulary: max and sum of exponentials reduced over TP.
            row_max = logits.amax(dim=-1)
            if tp > 1:
                torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX, group=group)
            exp = torch.exp_(logits.sub_(row_max[:, None]))  # in place: the chunk's one buffer
            sum_exp = exp.sum(dim=-1)
            if tp > 1:
                torch.distributed.all_reduce(sum_exp, group=group)
            chunk_lse = row_max + torch.log(sum_exp)
            lse[positions] = chunk_lse
            weighted = min(start + len(positions), active) - start  # the first rows; the rest masked
            if weighted <= 0:
                continue
            # d loss_i / d logit_j = softmax_j * (1 + 2 z lse) - [j == target], times weight_i
            w = weights[positions[:weighted]]
            grad_logits = exp[:weighted].mul_(
                (w * (1.0 + 2.0 * z_loss_coeff * chunk_lse[:weighted]) / sum_exp[:weighted])[:, None])
            hit = rows < weighted
            grad_logits[rows[hit], cols[hit]] -= w[rows[hit]]
            if grad_hidden is not None:
                _hidden_grad_into(grad_hidden, buffers.in_model_dtype(grad_logits), weight, buffers,
                                  positions, start)
            if grad_weight is not None:
                _accumulate_weight_grad(grad_weight, grad_logits, hidden_rows[:weighted], weight_alpha)
        del buffers
        if tp > 1:
            torch.distributed.all_reduce(target_logit, group=group)
        if main_grad is not None:
            grad_weight = None
            ctx.main_grad_of, ctx.known_scale = weight, known_scale
        else:
            ctx.main_grad_of = None
            if grad_weight is not None and grad_weight.dtype != weight.dtype:
                grad_weight = grad_weight.to(weight.dtype)
        ctx.gradients = (grad_hidden, grad_weight)
        ctx.save_for_backward(weights)
        return lse - target_logit + z_loss_coeff * lse.square()

    @staticmethod
    def backward(ctx, grad_loss):
        (weights,) = ctx.saved_tensors
        if ctx.gradients is None:
            raise RuntimeError("the chunked cross-entropy computed its gradients in the forward; "
                               "they can be back-propagated once only (no retain_graph)")
        grad_hidden, grad_weight = ctx.gradients
        ctx.gradients = None
        scale = upstream_scale(grad_loss, weights)
        if ctx.main_grad_of is not None:
            known = ctx.known_scale
            if bool(weights.any()) and abs(scale - known) > KNOWN_SCALE_RTOL * max(abs(known), abs(scale)):
                raise RuntimeError(
                    f"the chunked cross-entropy added the output weight's gradient to its main_grad in "
                    f"the forward for an upstream gradient of {known:g} x its loss weights (Megatron-Core's "
                    f"schedule with calculate_per_token_loss and no grad_scale_func), but the backward "
                    f"got {scale:g} x: the step's loss scaling is not what the model's config declared")
            _added_to_main_grad(ctx.main_grad_of)
            ctx.main_grad_of = None
        if scale != 1.0:  # in place: the stored gradients are used once
            grad_hidden = grad_hidden.mul_(scale) if grad_hidden is not None else None
            grad_weight = grad_weight.mul_(scale) if grad_weight is not None else None
        return grad_hidden, grad_weight, None, None, None, None, None, None, None


def upstream_scale(grad_loss: torch.Tensor, weights: torch.Tensor, rtol: float = 1e-5) -> float:
    """The scalar ``c`` with ``grad_loss == c * weights`` (the gradient the per-token loss got
    from the objective); a ``RuntimeError`` when it is not of that form (the objective's
    ``token_weights`` did not describe its loss)."""
    g, w = grad_loss.to(torch.float64), weights.to(torch.float64)
    norm = torch.dot(w, w)
    scale = (torch.dot(g, w) / norm).item() if norm > 0 else 0.0
    if (g - scale * w).abs().max() > rtol * max(g.abs().max().item(), scale * w.abs().max().item()):
        raise RuntimeError("the per-token loss's gradient is not proportional to the loss weights given "
                           "to the chunked cross-entropy in the forward: the objective's loss is not "
                           "the weighted sum its token_weights declared")
    return scale


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    z_loss_coeff: float = 0.0,
    chunk_size: Optional[int] = None,
    tp_group=None,
    vocab_start: int = 0,
    loss_weights: Optional[torch.Tensor] = None,
    known_scale: Optional[float] = None,
) -> torch.Tensor:
    """Per-position loss ``[n]`` of ``hidden`` ``[n, h]`` against ``labels`` ``[n]`` through the
    output ``weight`` ``[vocab/tp, h]`` (this rank's rows, from ``vocab_start``), without ever
    holding the ``[n, vocab]`` logits.

    ``loss_weights`` ``[n]``: the loss this output feeds is ``c * sum(loss_weights * output)``
    with ``c`` a scalar (a token-weighted mean: pretraining, SFT); the gradients are then
    computed in the forward, with no recomputation, and the backward only scales them by ``c``
    (a ``RuntimeError`` there if the gradient it gets is not of that form). Without them (a loss
    not linear in the output: preference, RL) the backward recomputes each chunk's logits.

    ``known_scale``: the scalar ``c`` when it is known before the forward (the model's config
    says so: Megatron-Core's schedule with ``calculate_per_token_loss`` and no
    ``grad_scale_func`` back-propagates ``sum(loss_weights * output)`` with ``c = 1``). With
    ``loss_weights`` and a ``weight`` that has Megatron-Core DDP's ``main_grad``, the weight's
    gradient is then accumulated into ``main_grad`` in the forward (the backward raises a
    ``RuntimeError`` if its ``c`` differs); without it the weight's gradient is held until the
    backward. The recomputing path writes into ``main_grad`` whenever the weight has one.

    Under tensor parallelism (``tp_group`` of more than one rank) ``hidden`` must be the same on
    every rank and its gradient is this rank's share: route it through Megatron-Core's
    ``copy_to_tensor_model_parallel_region`` (or the sequence-parallel gather) first, as
    :func:`output_layer_loss` does.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    training = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if chunk_size is None:
        # The weight's gradient goes into main_grad (recomputing, or in the forward with the
        # scalar declared): no separate gradient held, so a larger chunk (MAIN_GRAD_CHUNK_FRACTION).
        into_main_grad = (training and weight.requires_grad and _main_grad(weight) is not None
                          and (loss_weights is None or known_scale is not None))
        chunk_size = default_chunk_size(weight.shape[0], weight.shape[1], into_main_grad)
    if loss_weights is not None and training:
        if loss_weights.shape != labels.shape:
            raise ValueError(f"loss_weights {tuple(loss_weights.shape)} must have the labels' shape "
                             f"{tuple(labels.shape)}")
        return _GradientsInForward.apply(hidden, weight, labels, loss_weights.detach(), float(z_loss_coeff),
                                         int(chunk_size), int(vocab_start), tp_group,
                                         None if known_scale is None else float(known_scale))
    return _RecomputeInBackward.apply(hidden, weight, labels, float(z_loss_coeff), int(chunk_size),
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
    loss_weights: Optional[torch.Tensor] = None,
    known_scale: Optional[float] = None,
) -> torch.Tensor:
    """The per-token loss ``[b, s]`` of a vocabulary-parallel output layer (Megatron-Core's
    ``ColumnParallelLinear`` without bias, ``weight`` ``[vocab/tp, h]``) on ``hidden_states``
    ``[s, b, h]`` (``[s/tp, b, h]`` under sequence parallelism) with ``labels`` ``[b, s]``: what
    ``GPTModel`` returns with labels, computed by :func:`linear_cross_entropy` (``loss_weights``
    ``[b, s]`` and ``known_scale``: see there)."""
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
        vocab_start=rank * weight.shape[0],
        loss_weights=None if loss_weights is None else loss_weights.t().reshape(s * b),
        known_scale=known_scale)
    return loss.view(s, b).t()
