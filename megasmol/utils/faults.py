"""Fault injection for the tests that prove recovery works (never set in real runs).

``MEGASMOL_FAULT=kind:step[,kind:first-last...]`` makes the process misbehave at a step (or at
each step of a range); ``MEGASMOL_FAULT_RANK=R`` limits it to the process launched as global rank
R (its ``RANK`` when this module is imported: an in-process restart may give it another rank
later, and a spare that takes rank R's place must not fail again):

* ``kill_in_save:N``: SIGKILL this process after checkpoint N's files are written and before it
  is renamed into place (the worst moment for a crash during a save);
* ``enospc_in_save:N``: fail checkpoint N's write as DCP does when the disk is full;
* ``full_disk_in_async_save:N``: with ``checkpoint.async_save``, fail checkpoint N's background
  write the way torch's zip writer does on a full disk (``unexpected pos``, no errno), reported
  when the trainer collects the finished save;
* ``kill_in_upload:N``: with an ``s3://`` ``checkpoint.dir``, SIGKILL this process halfway
  through checkpoint N's upload (after its first object, before the rest and ``latest``);
* ``corrupt_batch:N``: replace the tokens of step N with uniformly random ids (a planted
  loss spike);
* ``inf_grad:N``: after step N's backward pass, put an inf into this rank's gradients while the
  loss stays finite;
* ``sigterm_after_reduce:N``: send SIGTERM to this process right after step N's all-reduce (a
  signal that reaches one rank later than the others);
* ``hang:N``: block forever in step N before its forward pass (a stuck kernel or file system);
* ``kill:N``: SIGKILL this process in step N before its forward pass (a rank or its host lost);
* ``raise:N``: raise ``PlannedFault`` in step N before its forward pass, once per process (a
  rank's bug or a transient error; the in-process restart that follows runs step N again).
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "MEGASMOL_FAULT"
RANK_VAR = "MEGASMOL_FAULT_RANK"


LAUNCHED_AS = os.environ.get("RANK", "0")
"""The rank the launcher gave this process (``MEGASMOL_FAULT_RANK`` is compared with it)."""


def _planned() -> dict[str, tuple[int, int]]:
    rank = os.environ.get(RANK_VAR)
    if rank is not None and rank != LAUNCHED_AS:
        return {}
    plan = {}
    for item in filter(None, os.environ.get(ENV_VAR, "").split(",")):
        kind, _, steps = item.partition(":")
        first, _, last = steps.partition("-")
        plan[kind.strip()] = (int(first), int(last or first))
    return plan


def planned_at(kind: str, step: int) -> bool:
    first, last = _planned().get(kind, (0, -1))
    return first <= step <= last


def kill_if_planned(kind: str, step: int) -> None:
    if planned_at(kind, step):
        os.kill(os.getpid(), signal.SIGKILL)


def signal_if_planned(kind: str, step: int, sig: int = signal.SIGTERM) -> None:
    if planned_at(kind, step):
        os.kill(os.getpid(), sig)


class PlannedFault(RuntimeError):
    """The exception ``raise:N`` raises."""


_raised: set[tuple[str, int]] = set()


def raise_once_if_planned(kind: str, step: int) -> None:
    if planned_at(kind, step) and (kind, step) not in _raised:
        _raised.add((kind, step))
        raise PlannedFault(f"planned fault ({ENV_VAR}={kind}:{step}) on rank {os.environ.get('RANK', '0')}")


def hang_if_planned(kind: str, step: int) -> None:
    if planned_at(kind, step):
        threading.Event().wait()  # never set: blocks like a stuck kernel, GIL released


class FaultPlan:
    """The named seams of the training step and of the checkpoint writer: each calls them at its
    points. Production runs get ``NO_FAULTS``, whose seams do nothing; the tests'
    ``MEGASMOL_FAULT`` gives ``PlannedFaults``, which acts out the kinds listed above."""

    def batch(self, step: int, micro: list[dict], vocab_size: int) -> list[dict]:
        """The micro-batches step ``step`` trains on."""
        return micro

    def before_forward(self, step: int) -> None:
        """After the gradients are zeroed, before the forward pass."""

    def after_backward(self, step: int, ddp_model) -> None:
        """After the backward pass, before the gradients are checked and all-reduced."""

    def after_reduce(self, step: int) -> None:
        """Right after the step's all-reduce (trained or skipped step)."""

    def before_write(self, step: int) -> None:
        """Checkpoint ``step``: before its files are written."""

    def async_request(self, step: int, request) -> None:
        """Checkpoint ``step``, async: its request (Megatron's ``AsyncRequest``) before it is
        scheduled."""

    def before_commit(self, step: int) -> None:
        """Checkpoint ``step``: its files are written, not yet renamed into place."""

    def before_upload(self, step: int, index: int) -> None:
        """Checkpoint ``step``'s upload to a bucket: before its ``index``-th file (from 0)."""


NO_FAULTS = FaultPlan()


class PlannedFaults(FaultPlan):
    def batch(self, step, micro, vocab_size):
        if not planned_at("corrupt_batch", step):
            return micro
        import torch

        generator = torch.Generator().manual_seed(step)
        return [{**mb, "tokens": torch.randint(0, vocab_size, mb["tokens"].shape, generator=generator),
                 "labels": torch.randint(0, vocab_size, mb["labels"].shape, generator=generator)}
                for mb in micro]

    def before_forward(self, step):
        hang_if_planned("hang", step)
        kill_if_planned("kill", step)
        raise_once_if_planned("raise", step)

    def after_backward(self, step, ddp_model):
        if planned_at("inf_grad", step):
            ddp_model.buffers[0].grad_data[0] = float("inf")

    def after_reduce(self, step):
        signal_if_planned("sigterm_after_reduce", step)

    def before_write(self, step):
        if planned_at("enospc_in_save", step):  # what DCP raises when the disk is full
            from torch.distributed.checkpoint.api import CheckpointException

            raise CheckpointException("save", {_rank(): (OSError(28, "No space left on device"), None)})

    def async_request(self, step, request):
        if planned_at("full_disk_in_async_save", step):
            request.add_finalize_fn(_fail_like_a_full_disk)

    def before_commit(self, step):
        kill_if_planned("kill_in_save", step)

    def before_upload(self, step, index):
        if index == 1:
            kill_if_planned("kill_in_upload", step)


def _rank() -> int:
    import torch

    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _fail_like_a_full_disk() -> None:
    """What Megatron's async writer reports when torch's zip writer runs out of space."""
    from torch.distributed.checkpoint.api import CheckpointException

    raise CheckpointException("write", {_rank(): (RuntimeError(
        "Worker failure: [enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), None)})


def fault_plan() -> FaultPlan:
    """``PlannedFaults`` when ``MEGASMOL_FAULT`` is set, else ``NO_FAULTS``."""
    return PlannedFaults() if os.environ.get(ENV_VAR) else NO_FAULTS
