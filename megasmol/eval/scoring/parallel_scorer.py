"""Log-likelihoods from a Megatron-Core model in any TP / PP / CP / DP layout (a collective).

Where each data-parallel rank holds the whole model (TP = PP = CP = 1, the usual layout of small
ablations), the choices of a question are scored against one pass over their shared context
(``shared_context``, as the single-process scorers do), whole questions shared out over the
ranks. Everything else (other layouts, requests that share no context):
requests are shared out over data-parallel ranks, sorted longest first, padded into groups of
equal-shaped micro-batches (the pipeline exchanges fixed shapes, so every rank of a pipeline runs
the same number with the same length), and run through Megatron-Core's pipeline schedule in
forward-only mode: the model returns per-token cross-entropy (vocabulary-parallel under TP) and
the last stage sums it over each continuation. Under CP each rank holds its share of every
sequence (Megatron-Core's load-balanced split, lengths padded to a multiple of 2 x CP) and sums
its part. One all-reduce gives every rank every result; TP ranks hold the same sums and only TP
rank 0 contributes. The z-loss term is off while scoring, the model is in eval mode and back in
train mode afterwards, and nothing is drawn from an RNG.

Greedy generations: the decode room's parallel decoder (``decode.parallel``, the same tokens as
the one-process KV-cache path) over this rank's share of the prompts (shared out over
data-parallel ranks, longest first, in groups of 16 micro-batches); one all-reduce at the end gives
every rank every generation. The progress (``gen_progress.GenerationProgress``) counts every
replica's tokens (each rank sees them all); finished prompts are this rank's times the
data-parallel size.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from megasmol.data.masking import ModelInputs, context_parallel_share
from megasmol.eval.scoring.gen_progress import GenerationProgress
from megasmol.eval.scoring.log_probs import LogProbs
from megasmol.eval.scoring.requests import Generation, GenerationRequest, TokenRequest, check_vocabulary
from megasmol.eval.scoring.scorers import megatron_head, megatron_prefix
from megasmol.eval.scoring.shared_context import score_shared
from megasmol.runtime.distributed import current_device
from megasmol.runtime.pipeline_shapes import all_max, padded_length


@contextlib.contextmanager
def _scoring(model_chunk, forward_model):
    """Log-likelihoods of the model itself: no z-loss term, and temperature 1 (an RL run's loss
    divides the logits by ``rl.temperature``; in-loop scores must equal the offline command's)."""
    from megasmol.model.gpt import plain_cross_entropy, sampling_temperature

    was_training = forward_model.training
    forward_model.eval()
    try:
        with torch.no_grad(), plain_cross_entropy(model_chunk), sampling_temperature(model_chunk, 1.0):
            yield
    finally:
        forward_model.train(was_training)


class PipelineScorer:
    """A Megatron-Core model split over the job (``api.Scorer``; a collective). ``model_chunk``:
    this rank's SmolGPTModel; ``forward_model``: what the schedule runs (the DDP wrapper during
    training, the chunk itself offline)."""

    def __init__(self, model_chunk, forward_model, *, micro_batch_size: int, max_length: int,
                 vocab_size: int, tokenizer, name: str):
        self.model_chunk, self.forward_model = model_chunk, forward_model
        self.micro, self.max_length, self.vocab_size = micro_batch_size, max_length, vocab_size
        self.tokenizer, self.name = tokenizer, name

    def loglikelihoods(self, requests: list[TokenRequest], progress=None) -> list[float]:
        from megatron.core import parallel_state as ps

        from megasmol.runtime.pipeline import per_sequence_losses

        check_vocabulary(requests, self.vocab_size, self.name)
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        totals = torch.zeros(len(requests), dtype=torch.float64)
        prefix, log_probs = self._shared_path or (None, None)
        with _scoring(self.model_chunk, self.forward_model):
            found, rest = score_shared(prefix, log_probs, requests, self.max_length,
                                       SHARED_BATCH_TOKENS, _Scaled(progress, dp), dp_rank, dp)
        for index, value in found.items():
            totals[index] = value
        mine = rest[dp_rank::dp]
        windows = {i: requests[i].window(self.max_length) for i in mine}
        mine.sort(key=lambda i: -len(windows[i][0]))
        rounds = all_max(len(mine))
        per_group = self.micro * 16  # micro-batches per schedule call (pipelines fill better)
        with _scoring(self.model_chunk, self.forward_model):
            for start in range(0, rounds, per_group):
                group = mine[start:start + per_group]
                length = padded_length(all_max(max((len(windows[i][0]) for i in group), default=1)),
                                 self.model_chunk)
                micro = [_inputs([windows[i] for i in group[k:k + self.micro]], self.micro, length)
                         for k in range(0, per_group, self.micro)]
                sums = per_sequence_losses(self.forward_model, micro)
                if sums and ps.get_tensor_model_parallel_rank() == 0:
                    flat = torch.cat(sums)
                    for row, index in enumerate(group):
                        totals[index] = -flat[row]
                if progress is not None:
                    progress.update(len(group) * dp)
        totals = totals.to(current_device())
        torch.distributed.all_reduce(totals)
        return totals.cpu().tolist()

    def generations(self, requests: list[GenerationRequest], progress=None) -> list[Generation]:
        """Every rank calls this and gets every (greedy) generation."""
        from megatron.core import parallel_state as ps

        from megasmol.decode.parallel import generate_parallel

        progress = progress if progress is not None else GenerationProgress()
        tokenizer = self.tokenizer
        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        prompts = [r.prompt_ids(tokenizer, self.max_length) for r in requests]
        mine = sorted((i for i in range(len(requests)) if i % dp == dp_rank), key=lambda i: -len(prompts[i]))
        per_group = self.micro * 16
        new_ids = torch.full((len(requests), max(r.max_new_tokens for r in requests)), -1, dtype=torch.long)
        for start in range(0, all_max(len(mine)), per_group):
            group = mine[start:start + per_group]
            progress.task(", ".join(dict.fromkeys(requests[i].task for i in group)))
            done = generate_parallel(
                self.model_chunk, self.forward_model, [prompts[i] for i in group],
                [requests[i].max_new_tokens for i in group], micro_batch_size=self.micro,
                eos_token_id=tokenizer.eos_token_id,
                stop=functools.partial(_stopped, [requests[i] for i in group], tokenizer),
                on_step=lambda generated, finished: progress.step(generated, finished * dp))
            for index, completion in zip(group, done):
                new_ids[index, :len(completion.tokens)] = torch.tensor(completion.tokens, dtype=torch.long)
        new_ids = new_ids.to(current_device())
        torch.distributed.all_reduce(new_ids, op=torch.distributed.ReduceOp.MAX)  # -1: not mine
        results = [request.result(tokenizer, [t for t in ids if t >= 0])
                   for request, ids in zip(requests, new_ids.cpu().tolist())]
        progress.done(0, sum(r.truncated for r in results))
        progress.finish()
        return results

    def scoring(self):
        """This scorer's model in forward-only mode while the block runs (``_scoring``)."""
        return _scoring(self.model_chunk, self.forward_model)

    @functools.cached_property
    def _shared_path(self):
        """(``MegatronPrefix``, ``LogProbs``) where each rank holds the whole model and its
        attention backend takes padding masks; None otherwise. Built once: the output layer
        keeps its logits buffer."""
        prefix = megatron_prefix(self.model_chunk) if _whole_model_per_rank() else None
        return None if prefix is None else (prefix, LogProbs(megatron_head(self.model_chunk)))


SHARED_BATCH_TOKENS = 8192
"""Padded tokens per pass of the shared-context path (the single-process scorers' default)."""


def _whole_model_per_rank() -> bool:
    from megatron.core import parallel_state as ps

    return (ps.get_tensor_model_parallel_world_size() == 1
            and ps.get_pipeline_model_parallel_world_size() == 1
            and ps.get_context_parallel_world_size() == 1)


def _stopped(requests: list[GenerationRequest], tokenizer, row: int, new: list[int]) -> bool:
    return requests[row].stopped(tokenizer, new)


class _Scaled:
    """A progress bar advanced by ``factor`` x what this rank scored (every rank scores its share)."""

    def __init__(self, progress, factor: int):
        self.progress, self.factor = progress, factor

    def update(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n * self.factor)


def _inputs(windows: list, micro: int, length: int) -> ModelInputs:
    tokens = torch.zeros(micro, length, dtype=torch.long)
    labels = torch.zeros(micro, length, dtype=torch.long)
    mask = torch.zeros(micro, length, dtype=torch.float32)
    for row, (ids, continuation) in enumerate(windows):
        n = len(ids)
        whole = ids + continuation[-1:]
        tokens[row, :n] = torch.tensor(ids)
        labels[row, :n] = torch.tensor(whole[1:])
        mask[row, n - len(continuation):n] = 1.0
    positions = torch.arange(length).unsqueeze(0).expand(micro, length).contiguous()
    return context_parallel_share(ModelInputs(tokens, positions, labels, mask)).to(current_device())
