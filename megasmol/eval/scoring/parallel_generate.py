"""Greedy decoding with a Megatron-Core model in any TP / PP / CP / DP layout (a collective).

The training layout has no inference context, so there is no KV cache here: every new token
recomputes its prefix, but a whole group of prompts advances together. Prompts are shared out
over data-parallel ranks, longest first; each step runs one forward-only pass of Megatron-Core's
pipeline schedule over the unfinished rows, right-padded (a causal model never attends to the
padding), and the last stage takes each row's argmax at its last position:

* under TP each rank holds a slice of the vocabulary, so each rank's (max logit, id) is gathered
  over the TP group and the largest wins (the lowest id on a tie, as ``argmax`` does);
* under CP the last position lives on one CP rank (Megatron-Core's load-balanced split); the
  position ids that ``context_parallel_share`` hands out say which.

One all-reduce per step gives every rank of every replica the new tokens. The stopping rules are
``GenerationRequest.stopped`` (EOS, a stop string, the length limit), those of the one-process
path (``generate.greedy_generate`` with the KV cache), which gives the same tokens; they are
checked after every token, and a finished row leaves the next step's batch. The progress
(``gen_progress.GenerationProgress``) counts every replica's tokens (each rank sees them all);
finished prompts are this rank's times the data-parallel size.
"""

from __future__ import annotations

from functools import partial

import torch

from megasmol.data.masking import ModelInputs, context_parallel_share
from megasmol.eval.scoring.gen_progress import GenerationProgress
from megasmol.eval.scoring.pipeline_shapes import all_max, padded_length
from megasmol.eval.scoring.requests import Generation, GenerationRequest
from megasmol.runtime.distributed import current_device


def parallel_generations(scorer, requests: list[GenerationRequest], progress=None) -> list[Generation]:
    """``scorer``: a ``PipelineScorer``; every rank calls this and gets every generation."""
    from megatron.core import parallel_state as ps

    progress = progress if progress is not None else GenerationProgress()
    tokenizer = scorer.tokenizer
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    prompts = [r.prompt_ids(tokenizer, scorer.max_length) for r in requests]
    mine = sorted((i for i in range(len(requests)) if i % dp == dp_rank), key=lambda i: -len(prompts[i]))
    per_group = scorer.micro * 16
    longest_new = max(r.max_new_tokens for r in requests)
    new_ids = torch.full((len(requests), longest_new), -1, dtype=torch.long)
    for start in range(0, all_max(len(mine)), per_group):
        group = mine[start:start + per_group]
        progress.task(", ".join(dict.fromkeys(requests[i].task for i in group)))
        rows = {i: list(prompts[i]) for i in group}
        active = list(group)
        while all_max(len(active)):
            picked, generated = _next_tokens(scorer, [rows[i] for i in active], per_group, dp, dp_rank)
            finished = 0
            for index, token in zip(list(active), picked.tolist()):
                rows[index].append(token)
                new = rows[index][len(prompts[index]):]
                if requests[index].stopped(tokenizer, new):
                    new_ids[index, :len(new)] = torch.tensor(new)
                    active.remove(index)
                    finished += dp
            progress.step(generated, finished)
    new_ids = new_ids.to(current_device())
    torch.distributed.all_reduce(new_ids, op=torch.distributed.ReduceOp.MAX)  # -1: not mine
    results = [request.result(tokenizer, [t for t in ids if t >= 0])
               for request, ids in zip(requests, new_ids.cpu().tolist())]
    progress.done(0, sum(r.truncated for r in results))
    progress.finish()
    return results


def _next_tokens(scorer, rows: list[list[int]], per_group: int, dp: int,
                 dp_rank: int) -> tuple[torch.Tensor, int]:
    """Every rank of this replica: the argmax token after each of ``rows`` (possibly none), and
    how many tokens every replica together picked."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasmol.runtime.pipeline import StepGeometry

    found = torch.full((dp, per_group), -1, dtype=torch.long)
    length = padded_length(all_max(max((len(r) for r in rows), default=1)), scorer.model_chunk)
    if rows:
        micro = [_inputs(rows[k:k + scorer.micro], scorer.micro, length)
                 for k in range(0, len(rows), scorer.micro)]
        geometry = StepGeometry.of(micro[0][0])
        with scorer.scoring():
            outputs = get_forward_backward_func()(
                forward_step_func=_forward_step, data_iterator=iter(micro),
                model=[scorer.forward_model], num_microbatches=len(micro),
                seq_length=geometry.seq_length, micro_batch_size=geometry.micro_batch_size,
                forward_only=True)
        if outputs:  # the last pipeline stage
            found[dp_rank, :len(rows)] = torch.cat([o["next"].cpu() for o in outputs])[:len(rows)]
    found = found.to(current_device())
    torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
    return found[dp_rank, :len(rows)].cpu(), int((found >= 0).sum())


def _forward_step(data_iterator, model):
    inputs, targets = next(data_iterator)
    logits = model(inputs.tokens, inputs.position_ids, inputs.attention_mask)
    return logits, partial(_pick, inputs.position_ids, targets)


def _pick(positions: torch.Tensor, targets: torch.Tensor, logits: torch.Tensor):
    """Last stage: [b] argmax ids at each row's ``targets`` position (-1 where another CP rank
    holds that position, or for a padding row)."""
    from megatron.core import parallel_state as ps

    chosen = torch.full((logits.shape[0],), -1, dtype=torch.long, device=logits.device)
    rows, cols = (positions == targets.unsqueeze(1)).nonzero(as_tuple=True)
    if rows.numel():  # the same rows on every TP rank of this CP rank
        value, index = logits[rows, cols].float().max(dim=-1)
        index = index + ps.get_tensor_model_parallel_rank() * logits.shape[-1]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1:
            group = ps.get_tensor_model_parallel_group()
            values, indices = [torch.empty_like(value) for _ in range(tp)], [torch.empty_like(index)
                                                                              for _ in range(tp)]
            torch.distributed.all_gather(values, value, group=group)
            torch.distributed.all_gather(indices, index, group=group)
            best = torch.stack(values).argmax(dim=0, keepdim=True)  # first max: the lowest id
            index = torch.stack(indices).gather(0, best).squeeze(0)
        chosen[rows] = index
    zero = torch.zeros((), device=logits.device)
    return zero, torch.ones((), dtype=torch.int, device=logits.device), {"next": chosen}


def _inputs(rows: list[list[int]], micro: int, length: int):
    tokens = torch.zeros(micro, length, dtype=torch.long)
    targets = torch.full((micro,), -1, dtype=torch.long)
    for row, ids in enumerate(rows):
        tokens[row, :len(ids)] = torch.tensor(ids)
        targets[row] = len(ids) - 1
    positions = torch.arange(length).unsqueeze(0).expand(micro, length).contiguous()
    zeros = torch.zeros(micro, length)
    inputs = context_parallel_share(ModelInputs(tokens, positions, zeros.long(), zeros))
    return inputs.to(current_device()), targets.to(current_device())
