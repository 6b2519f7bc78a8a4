"""Downstream evaluation inside the training loop: the training model itself, in its layout.

The loop calls :meth:`InLoopEvaluation.maybe_run` after each step. When due (every
``eval.tasks_interval`` steps, or at every checkpoint with ``eval.tasks_at_checkpoint``), every
request of every task (built once, at start) is scored through Megatron-Core's pipeline schedule
in forward-only mode: the model returns per-token cross-entropy (vocabulary-parallel under TP), a
loss mask selects the continuation tokens, and the last pipeline stage sums them per sequence.
Requests are shared out over data-parallel ranks and one all-reduce gives every rank all of
them; TP ranks hold the same sums and only TP rank 0 contributes. Scoring is the offline
``megasmol eval tasks`` scoring (same requests, same judging), so the numbers agree with it.

It never changes the training: no gradients, no optimizer state, no RNG draws, the model back in
train mode afterwards (and the z-loss term off while scoring, so log-likelihoods are pure).
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch

from megasmol.config.typed import ConfigError
from megasmol.data.masking import ModelInputs
from megasmol.eval.formulations import judge, prompt_and_continuations
from megasmol.eval.formulations import aggregate
from megasmol.eval.requests import encode_pair
from megasmol.eval.runner import TaskResult
from megasmol.eval.tasks import load_task, sample
from megasmol.runtime.distributed import current_device


@contextlib.contextmanager
def _scoring(model_chunk, ddp_model):
    z_loss = getattr(model_chunk, "z_loss_coeff", 0.0)
    model_chunk.z_loss_coeff = 0.0
    ddp_model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        ddp_model.train()
        model_chunk.z_loss_coeff = z_loss


class InLoopEvaluation:
    def __init__(self, config, spec, tokenizer_dir):
        settings = config.eval
        self.interval, self.at_checkpoint = settings.tasks_interval, settings.tasks_at_checkpoint
        self.checkpoint_interval = config.checkpoint.interval
        self.micro = config.training.micro_batch_size
        if config.parallel.context_parallel > 1:
            raise ConfigError("eval.tasks under parallel.context_parallel > 1 is not supported yet; "
                              "score the checkpoints with megasmol eval tasks (post_save_command)")
        if tokenizer_dir is None:
            raise ConfigError("eval.tasks needs a tokenizer: set data.tokenizer")
        from megasmol.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir)
        self.tasks = [load_task(_resolved(config, name)) for name in settings.tasks]
        self.plans, self.requests = [], []
        for task in self.tasks:
            built = []
            for example in sample(task.examples(), settings.tasks_limit, config.training.seed):
                prompt, conts = prompt_and_continuations(example, task.spec.formulation,
                                                         task.spec.target_delimiter, [])
                built.append((example, prompt, conts))
                self.requests += [encode_pair(tokenizer, prompt, c) for c in conts]
            self.plans.append((task, built))
        self.max_length = spec.max_position_embeddings
        largest = max((max(r.context + r.continuation) for r in self.requests), default=0)
        if largest >= spec.vocab_size:
            raise ConfigError(f"eval.tasks: the tokenizer produced id {largest}, beyond the model's "
                              f"vocabulary of {spec.vocab_size}")

    def due(self, step: int, last_step: int) -> bool:
        if self.interval and step % self.interval == 0:
            return True
        return self.at_checkpoint and (step == last_step or (
            self.checkpoint_interval and step % self.checkpoint_interval == 0))

    def run(self, setup) -> list[TaskResult]:
        """Collective: every rank calls it; every rank returns the same results."""
        from megatron.core import parallel_state as ps

        from megasmol.train.step import per_sequence_losses

        dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        mine = [i for i in range(len(self.requests)) if i % dp == dp_rank]
        windows = {i: self.requests[i].window(self.max_length) for i in mine}
        mine.sort(key=lambda i: -len(windows[i][0]))
        # Every rank of a pipeline must run the same number of equal-shaped micro-batches.
        counts = torch.tensor([len(mine)], dtype=torch.long, device=current_device())
        torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
        per_group = self.micro * 4
        totals = torch.zeros(len(self.requests), dtype=torch.float64)
        with _scoring(setup.model, setup.ddp_model):
            for start in range(0, int(counts.item()), per_group):
                group = mine[start:start + per_group]
                length = _agreed_length([len(windows[i][0]) for i in group])
                micro = [_inputs([windows[i] for i in group[k:k + self.micro]], self.micro, length)
                         for k in range(0, per_group, self.micro)]
                sums = per_sequence_losses(setup.ddp_model, micro)
                if sums and ps.get_tensor_model_parallel_rank() == 0:
                    flat = torch.cat(sums)
                    for row, index in enumerate(group):
                        totals[index] = -flat[row]
        totals = totals.to(current_device())
        torch.distributed.all_reduce(totals)
        lls = totals.cpu().tolist()
        return self._judge(lls)

    def _judge(self, lls: list[float]) -> list[TaskResult]:
        results, cursor = [], 0
        for task, built in self.plans:
            scored = []
            for index, (example, prompt, conts) in enumerate(built):
                scored.append(judge(index, example, task.spec.formulation, prompt, conts,
                                    lls[cursor:cursor + len(conts)]))
                cursor += len(conts)
            results.append(TaskResult(task.name, task.spec.formulation,
                                      aggregate(scored, task.spec.formulation), len(scored),
                                      task.spec.chance, 0, scored))
        return results

    @staticmethod
    def record(step: int, results: list[TaskResult]) -> dict:
        record = {"step": step}
        for r in results:
            for name, (value, err) in r.metrics.items():
                record[f"{r.name}/{name}"] = value
                record[f"{r.name}/{name}_stderr"] = err if math.isfinite(err) else None
        return record

    @staticmethod
    def line(step: int, results: list[TaskResult]) -> str:
        parts = [f"{r.name} " + " ".join(f"{k} {v:.4f}" for k, (v, _) in r.metrics.items())
                 for r in results]
        return f"downstream at step {step}: " + " | ".join(parts)


def _resolved(config, name: str) -> str:
    candidate = config.path(name)
    return str(candidate) if candidate.exists() else name


def _agreed_length(lengths: list[int]) -> int:
    """The padded length of a group, the same on every rank (the pipeline's fixed shape)."""
    local = torch.tensor([max(lengths, default=1)], dtype=torch.long, device=current_device())
    torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
    return int(local.item())


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
    return ModelInputs(tokens, positions, labels, mask).to(current_device())


def maybe_evaluation(config, spec, tokenizer_dir) -> Optional[InLoopEvaluation]:
    return InLoopEvaluation(config, spec, tokenizer_dir) if config.eval.tasks else None
