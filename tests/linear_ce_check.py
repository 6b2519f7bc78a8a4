"""The chunked linear cross-entropy against the plain path (logits, then cross-entropy), at any
tensor-parallel size: used in-process (TP=1) and by ``workers/linear_ce_layouts.py`` (TP=2)."""

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel

from megasmol.model.gpt import build_model
from megasmol.model.linear_cross_entropy import output_layer_loss
from megasmol.runtime.distributed import set_seed


def rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def plain_token_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss_coeff: float) -> torch.Tensor:
    """Per-token CE + z * lse^2 from full logits ``[n, v]``; a label outside the vocabulary has
    no target logit (Megatron-Core's vocab-parallel CE): its loss is the lse."""
    lse = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
    return torch.where(labels < 0, lse, ce) + z_loss_coeff * lse.square()


def function_errors(z_loss_coeff: float, chunk_size: int, seq: int = 13, batch: int = 3,
                    hidden: int = 24, vocab: int = 200, in_forward: bool = True,
                    scale: float = 1.0) -> dict:
    """``output_layer_loss`` on this rank's vocabulary shard vs the plain loss on the whole
    vocabulary in one process: relative errors of the loss and both gradients (fp32) of
    ``scale * sum(mask * loss)``. ``in_forward``: the mask is given as the loss weights (the
    gradients are made in the forward); else the backward recomputes the logits."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(seq, batch, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[0, 2] = labels[2, 7] = -100  # ignored positions: outside the vocabulary
    mask = (torch.rand(batch, seq, generator=gen) > 0.3).float()  # masked positions: no gradient
    shard = vocab // tp

    h_c = h.clone().requires_grad_()
    w_c = w[rank * shard:(rank + 1) * shard].clone().requires_grad_()
    loss = output_layer_loss(h_c, w_c, labels, z_loss_coeff=z_loss_coeff, chunk_size=chunk_size,
                             tp_group=parallel_state.get_tensor_model_parallel_group(),
                             loss_weights=mask if in_forward else None)
    (scale * (loss * mask).sum()).backward()
    grad_w = w_c.grad
    if tp > 1:
        grad_w = tensor_parallel.gather_from_tensor_model_parallel_region(grad_w.t()).t()

    h_p, w_p = h.clone().requires_grad_(), w.clone().requires_grad_()
    logits = torch.einsum("sbh,vh->bsv", h_p, w_p)
    expected = plain_token_loss(logits.flatten(0, 1), labels.flatten(), z_loss_coeff).view(batch, seq)
    (scale * (expected * mask).sum()).backward()
    assert loss.shape == expected.shape
    return {"loss": rel(loss.detach(), expected.detach()), "grad_hidden": rel(h_c.grad, h_p.grad),
            "grad_weight": rel(grad_w, w_p.grad)}


def model_errors(spec, z_loss_coeff: float, in_forward: bool = True) -> dict:
    """The model built with ``cross_entropy="chunked"`` vs ``"plain"`` (same weights): relative
    errors of the per-token loss, of every parameter's gradient, and of the loss at selected
    positions (``loss_positions``, forward-only scoring). ``in_forward``: the mask goes to the
    model as ``loss_weights``."""
    spec = spec.replace(z_loss_coeff=z_loss_coeff)
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, spec.vocab_size, (2, 16), generator=gen)
    labels = torch.randint(0, spec.vocab_size, (2, 16), generator=gen)
    mask = (torch.rand(2, 16, generator=gen) > 0.25).float()
    positions = torch.arange(16).unsqueeze(0).expand(2, -1)
    results = {}
    for name in ("plain", "chunked"):
        set_seed(3)
        model = build_model(spec, cross_entropy=name)
        weights = {"loss_weights": mask} if in_forward else {}
        loss = model(ids, positions, None, labels=labels, **weights)
        (loss * mask).sum().backward()
        with torch.no_grad():
            scored = model(ids, positions, None, labels=labels, loss_positions=mask > 0)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[name] = (loss.detach(), grads, scored)
    (loss, grads, scored), (loss_ref, grads_ref, scored_ref) = results["chunked"], results["plain"]
    assert grads.keys() == grads_ref.keys()
    return {"loss": rel(loss, loss_ref), "scored": rel(scored, scored_ref),
            "grads": max(rel(grads[n], grads_ref[n]) for n in grads_ref)}


def _micro_batch(spec, gen, objective: str, batch: int = 2, seq: int = 32) -> dict:
    """One collated micro-batch for ``objective``: ``pretraining`` (every label counts), ``sft``
    (a prompt's labels masked out) or ``preference`` (two pairs per micro-batch: each row a
    chosen then a rejected completion, with reference log-probs)."""
    tokens = torch.randint(3, spec.vocab_size, (batch, seq + 1), generator=gen)
    out = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:].clone(),
           "position_ids": torch.arange(seq).expand(batch, -1).clone(),
           "loss_mask": torch.ones(batch, seq)}
    if objective == "sft":
        out["loss_mask"][:, :seq // 3] = 0  # the prompt
        out["loss_mask"][1, -3:] = 0  # padding
    elif objective == "preference":
        half = seq // 2
        out["segments"] = torch.cat([torch.zeros(batch, half, dtype=torch.long),
                                     torch.ones(batch, seq - half, dtype=torch.long)], dim=1)
        out["loss_mask"][:, :4] = out["loss_mask"][:, half:half + 4] = 0  # each half's prompt
        out["ref_logps"] = torch.zeros(batch, seq, dtype=torch.float64)
        out["ref_logps"][:, 5] = -40.0 - torch.rand(batch, generator=gen, dtype=torch.float64)
        out["ref_logps"][:, half + 5] = -40.0 - torch.rand(batch, generator=gen, dtype=torch.float64)
    return out


def _share(spec, gen, objective: str) -> dict:
    """A micro-batch as the model takes it: this rank's context-parallel share."""
    from megasmol.data.masking import context_parallel_share, model_inputs

    return context_parallel_share(model_inputs(_micro_batch(spec, gen, objective), spec.eos_token_id,
                                               False, "sbhd"))


def _objective(objective: str):
    """The loss the trainer computes for ``objective`` (preference: DPO's sigmoid with an SFT term)."""
    from megasmol.config.preference import PreferenceConfig
    from megasmol.train.objectives import PreferenceLoss, TokenLoss

    return (PreferenceLoss(PreferenceConfig(loss_type="sigmoid", beta=0.1, sft_weight=0.5))
            if objective == "preference" else TokenLoss())


def objective_errors(spec, objective: str, micro_batches: int = 2) -> dict:
    """One training step's forward and backward through Megatron-Core's schedule (this rank's
    share of the current layout: a pipeline stage, a context-parallel share) with the model built
    ``chunked`` vs ``plain`` (same weights), for the pretraining, SFT or preference loss: relative
    errors of the step's loss sum and of every parameter's gradient on this rank."""
    from megasmol.model.gpt import plain_cross_entropy
    from megasmol.train.step import forward_backward

    gen = torch.Generator().manual_seed(11)
    batches = [_share(spec, gen, objective) for _ in range(micro_batches)]
    loss = _objective(objective)
    results = {}
    for name in ("plain", "chunked"):
        set_seed(3)
        model = build_model(spec, cross_entropy=name)
        model.config.calculate_per_token_loss = True  # as the trainer sets it
        if objective == "preference":
            with plain_cross_entropy(model):
                totals = forward_backward(model, batches, objective=loss)
        else:
            totals = forward_backward(model, batches, objective=loss)
        results[name] = (totals, {n: p.grad.clone() for n, p in model.named_parameters()
                                  if p.grad is not None})
    (totals, grads), (totals_ref, grads_ref) = results["chunked"], results["plain"]
    assert grads.keys() == grads_ref.keys() and grads_ref
    last_stage = parallel_state.is_pipeline_last_stage()
    return {"loss": rel(totals[0], totals_ref[0]) if last_stage else 0.0,
            "grads": max(rel(grads[n], grads_ref[n]) for n in grads_ref),
            "loss_sum": float(totals_ref[0]) if last_stage else 0.0}


def ddp_step_errors(spec, objective: str, steps: int = 2, micro_batches: int = 2) -> dict:
    """``steps`` optimizer steps of the model wrapped as the trainer wraps it (Megatron-Core's DDP
    with its fp32 ``main_grad`` buffers, ``calculate_per_token_loss``, ``finalize_model_grads``,
    AdamW with eps 1, see below), chunked vs plain from the same weights and micro-batches
    (different ones on each data-parallel rank): relative errors of each step's loss sum, of
    every parameter's ``main_grad`` after each step's backward (reduced over data-parallel
    ranks and divided by the global token count), and of the weights after the last update.
    ``main_grad_marked``: the chunked model's output weight was marked
    ``grad_added_to_main_grad`` in every step (its gradient went straight into ``main_grad``;
    the plain path never marks it on CPU)."""
    from megatron.core.distributed import finalize_model_grads

    from megasmol.config.sections import OptimizerSettings
    from megasmol.model.gpt import plain_cross_entropy
    from megasmol.train.optimizer import apply_learning_rate, build_optimizer, wrap_ddp
    from megasmol.train.step import forward_backward

    gen = torch.Generator().manual_seed(13 + parallel_state.get_data_parallel_rank())
    steps_batches = [[_share(spec, gen, objective) for _ in range(micro_batches)] for _ in range(steps)]
    loss = _objective(objective)
    results = {}
    for name in ("plain", "chunked"):
        set_seed(3)
        model = build_model(spec, cross_entropy=name)
        model.config.calculate_per_token_loss = True
        ddp = wrap_ddp(model, distributed_optimizer=False)
        model.config.no_sync_func = ddp.no_sync
        model.config.finalize_model_grads_func = finalize_model_grads
        # Adam's eps large: its update is then about lr * g, linear in the gradient (with 1e-8 the
        # first update is lr * sign(g), which turns rounding-level differences of gradients near
        # zero into opposite updates, the same for any two summation orders).
        optimizer = build_optimizer(ddp, OptimizerSettings(distributed=False, eps=1.0), torch.float32)
        output_weight = (model.output_layer.weight if model.output_layer.weight is not None
                         else model.shared_embedding_or_output_weight()) if model.post_process else None
        losses, main_grads, marked = [], [], []
        for batches in steps_batches:
            apply_learning_rate(optimizer, 0.05, 0.1)
            ddp.zero_grad_buffer()
            optimizer.zero_grad()
            if objective == "preference":
                with plain_cross_entropy(model):
                    totals = forward_backward(ddp, batches, objective=loss)
            else:
                totals = forward_backward(ddp, batches, objective=loss)
            losses.append(totals[0])
            main_grads.append({n: p.main_grad.clone() for n, p in model.named_parameters()})
            marked.append(output_weight is None or output_weight.grad_added_to_main_grad)
            assert all(p.grad is None for p in model.parameters())  # DDP's hook took every .grad
            optimizer.step()
        results[name] = (losses, main_grads, {n: p.detach().clone() for n, p in model.named_parameters()},
                         all(marked))
    (losses, grads, weights, marked), (losses_ref, grads_ref, weights_ref, marked_ref) = (
        results["chunked"], results["plain"])
    last_stage = parallel_state.is_pipeline_last_stage()
    return {"loss": max(rel(a, b) for a, b in zip(losses, losses_ref)) if last_stage else 0.0,
            "main_grads": max(rel(g[n], r[n]) for g, r in zip(grads, grads_ref) for n in r),
            "weights": max(rel(weights[n], weights_ref[n]) for n in weights_ref),
            "loss_sum": float(losses_ref[0]) if last_stage else 0.0,
            "main_grad_marked": float(marked and (not last_stage or not marked_ref))}
