"""Fault injection for the tests that prove recovery works (never set in real runs).

``MEGASMOL_FAULT=kind:step[,kind:first-last...]`` makes the process misbehave at a step (or at
each step of a range); ``MEGASMOL_FAULT_RANK=R`` limits it to global rank R:

* ``kill_in_save:N``: SIGKILL this process after checkpoint N's files are written and before it
  is renamed into place (the worst moment for a crash during a save);
* ``enospc_in_save:N``: fail checkpoint N's write as DCP does when the disk is full;
* ``full_disk_in_async_save:N``: with ``checkpoint.async_save``, fail checkpoint N's background
  write the way torch's zip writer does on a full disk (``unexpected pos``, no errno), reported
  when the trainer collects the finished save;
* ``corrupt_batch:N``: replace the tokens of step N with uniformly random ids (a planted
  loss spike);
* ``inf_grad:N``: after step N's backward pass, put an inf into this rank's gradients while the
  loss stays finite;
* ``sigterm_after_reduce:N``: send SIGTERM to this process right after step N's all-reduce (a
  signal that reaches one rank later than the others);
* ``hang:N``: block forever in step N before its forward pass (a stuck kernel or file system).
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "MEGASMOL_FAULT"
RANK_VAR = "MEGASMOL_FAULT_RANK"


def _planned() -> dict[str, tuple[int, int]]:
    rank = os.environ.get(RANK_VAR)
    if rank is not None and rank != os.environ.get("RANK", "0"):
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


def hang_if_planned(kind: str, step: int) -> None:
    if planned_at(kind, step):
        threading.Event().wait()  # never set: blocks like a stuck kernel, GIL released
