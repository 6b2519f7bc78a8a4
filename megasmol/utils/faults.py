"""Fault injection for the tests that prove recovery works (never set in real runs).

``MEGASMOL_FAULT=kind:step[,kind:step...]`` makes the process misbehave at one point:

* ``kill_in_save:N``: SIGKILL this process after checkpoint N's files are written and before it
  is renamed into place (the worst moment for a crash during a save);
* ``corrupt_batch:N``: replace the tokens of step N with uniformly random ids (a planted
  loss spike).
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "MEGASMOL_FAULT"


def _planned() -> dict[str, int]:
    plan = {}
    for item in filter(None, os.environ.get(ENV_VAR, "").split(",")):
        kind, _, step = item.partition(":")
        plan[kind.strip()] = int(step)
    return plan


def planned_at(kind: str, step: int) -> bool:
    return _planned().get(kind) == step


def kill_if_planned(kind: str, step: int) -> None:
    if planned_at(kind, step):
        os.kill(os.getpid(), signal.SIGKILL)
