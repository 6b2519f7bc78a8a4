"""OpenMP's idle threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``), set before torch
loads GNU OpenMP (libgomp), which reads it once.

With as many OpenMP threads as CPUs, libgomp's threads busy-wait for the next parallel region
(up to 300,000 spins) before they sleep. On a machine whose cores other processes share, the
spinning worker burns the time slices the main thread's team needs, and every parallel region
waits for a worker the kernel has not scheduled: on the loaded 2-core VM (load average 3-10),
decoding in a fresh training process ran at 20-60 tokens/s with 2 torch threads against 360-440
with one, and a tiny RL run's first step took 4.6-10.6 s against 0.8-1.2 s for the next.
Once a gloo worker thread of the process has run a large copy (the first step's gradient
all-reduce), the process holds more OpenMP threads than CPUs and libgomp switches itself to
a short, throttled spin: that is why only the first step was slow (``runtime/threads.py``).
Passive waiting gives every step, the first included, the behaviour of the later ones
(``bench/RESULTS.md``, "RL: rollouts and a GRPO step"). A value the user set is kept
(``OMP_WAIT_POLICY=ACTIVE`` restores spinning, e.g. on a dedicated machine)."""

from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"


def passive_waits() -> bool:
    """Ask for passive OpenMP waits unless the user chose a policy; True when it takes effect
    (torch, hence libgomp, not loaded yet in this process; child processes inherit it anyway)."""
    os.environ.setdefault(POLICY, "PASSIVE")
    return "torch" not in sys.modules
