"""The ``resilience:`` section: in-process restart with NVIDIA Resiliency Extension (NVRx).

With ``in_process_restart: true`` every rank runs the training function inside NVRx's
``inprocess.Wrapper`` (``megasmol/train/inprocess.py``): when a rank raises or stops making
progress, the healthy ranks stay in their processes, rebuild their process groups, reload the
latest checkpoint and go on. The timeouts below are the Wrapper's; ``check_against`` holds them to
the constraints NVRx enforces (``Wrapper.__init__``) and to the other sections' timeouts, so a
config NVRx would refuse fails at load time with the field named.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.config.typed import PATH, ConfigError

MONITOR_INTERVAL_S = 1.0
"""NVRx's monitor thread, monitor process and progress watchdog poll this often (the Wrapper's
defaults, which megasmol keeps); every timeout must be longer."""


@dataclass
class ResilienceConfig:
    """In-process restart: heal a fault without restarting the job (``pip install 'megasmol[nvrx]'``)."""

    in_process_restart: bool = False
    """Run training inside NVRx's ``inprocess.Wrapper``: after a rank raises, freezes or stops
    answering, the healthy ranks rebuild their process groups in the same processes, resume from
    the latest checkpoint and continue (one console line per fault). Launch with torchrun
    ``--max-restarts 0`` or srun (docs/pretraining.md, "In-process restart")."""
    soft_timeout_s: float = 60.0
    """A rank whose main thread runs no Python for this long (stuck in one call: a collective, a
    kernel, a read from disk) is interrupted and the job restarts in-process; longer than any single
    blocking call of a healthy step, save or validation."""
    hard_timeout_s: float = 90.0
    """A rank still stuck this long (the interruption could not reach it) is terminated by NVRx's
    monitor process (SIGTERM, then SIGKILL)."""
    heartbeat_interval_s: float = 1.0
    """How often each rank's monitor process tells the others it is alive."""
    heartbeat_timeout_s: float = 30.0
    """A rank whose monitor sent no heartbeat for this long (its host died) is counted lost."""
    barrier_timeout_s: float = 120.0
    """How long the ranks wait for each other at NVRx's start, restart and completion barriers
    (a rank that does not arrive ends the job)."""
    max_restarts: int = 3
    """In-process restarts allowed in one job; one more fault ends it as without this section."""
    spare_ranks: int = 0
    """Processes launched beyond the ranks that train, idle until a rank is lost (terminated by
    the hard timeout, killed, or its host gone): one then takes its place, and training resumes on
    as many ranks as before (NVRx's ``MaxActiveWorldSize`` after ``ShiftRanks``). Launch the
    training world size plus this many. Without a spare, a lost rank ends the job with one line
    naming it. Needs a launcher that keeps the other processes when one exits (srun
    ``--kill-on-bad-exit=0``); torchrun stops every worker when one exits (docs/pretraining.md)."""
    local_checkpoint_every: int = 0
    """Every this many steps, keep a copy of the training state (model, optimizer, RNG streams,
    step and data position: what a checkpoint restores) in ``local_checkpoint_dir`` through NVRx's
    ``LocalCheckpointManager``; an in-process restart resumes from it where it is newer than the
    latest checkpoint. 0: off. Needs ``in_process_restart``; a fresh start never reads it, and the
    run removes it when it ends (docs/pretraining.md, "Local copies")."""
    local_checkpoint_dir: Optional[str] = field(default=None, metadata=PATH)
    """Node-local directory the copies are kept under, in ``megasmol-<run key>/`` (default
    ``/dev/shm``, a RAM disk: host memory; the system's temporary directory where there is none).
    Writable, and not inside the checkpoint directory."""
    store_port: Optional[int] = None
    """TCP port of the store NVRx's ranks coordinate through, hosted by rank 0 (default:
    ``MASTER_PORT + 1``); it must be free on rank 0's host."""

    def validate(self) -> None:
        for name in ("soft_timeout_s", "hard_timeout_s", "heartbeat_timeout_s", "barrier_timeout_s"):
            if not getattr(self, name) > MONITOR_INTERVAL_S:
                raise ConfigError(f"resilience.{name} must be > {MONITOR_INTERVAL_S:g} s (NVRx polls "
                                  f"every {MONITOR_INTERVAL_S:g} s), got {getattr(self, name)}")
        if not self.soft_timeout_s < self.hard_timeout_s < self.barrier_timeout_s:
            raise ConfigError("resilience: NVRx needs soft_timeout_s < hard_timeout_s < barrier_timeout_s, "
                              f"got {self.soft_timeout_s:g} / {self.hard_timeout_s:g} / "
                              f"{self.barrier_timeout_s:g}")
        if not 0 < self.heartbeat_interval_s < self.heartbeat_timeout_s:
            raise ConfigError("resilience.heartbeat_interval_s must be > 0 and below "
                              f"resilience.heartbeat_timeout_s={self.heartbeat_timeout_s:g}, got "
                              f"{self.heartbeat_interval_s:g}")
        if not self.heartbeat_timeout_s < self.barrier_timeout_s:
            raise ConfigError(f"resilience.heartbeat_timeout_s={self.heartbeat_timeout_s:g} must be below "
                              f"resilience.barrier_timeout_s={self.barrier_timeout_s:g} (NVRx)")
        if self.max_restarts < 0:
            raise ConfigError(f"resilience.max_restarts must be >= 0, got {self.max_restarts}")
        if self.spare_ranks < 0:
            raise ConfigError(f"resilience.spare_ranks must be >= 0, got {self.spare_ranks}")
        if self.spare_ranks and not self.in_process_restart:
            raise ConfigError("resilience.spare_ranks needs resilience.in_process_restart: true")
        if self.local_checkpoint_every < 0:
            raise ConfigError("resilience.local_checkpoint_every must be >= 0 (0: off), got "
                              f"{self.local_checkpoint_every}")
        if self.local_checkpoint_every and not self.in_process_restart:
            raise ConfigError("resilience.local_checkpoint_every needs resilience.in_process_restart: "
                              "true (only an in-process restart reads the local copies)")
        if self.local_checkpoint_dir is not None and not self.local_checkpoint_every:
            raise ConfigError("resilience.local_checkpoint_dir is set but resilience."
                              "local_checkpoint_every is 0: no local copy would be kept there")
        if self.store_port is not None and not 0 < self.store_port < 65536:
            raise ConfigError(f"resilience.store_port must be a TCP port (1-65535), got {self.store_port}")

    def training_world_size(self, launched: int) -> int:
        """The ranks that train when the launcher started ``launched`` processes."""
        if self.spare_ranks and launched - self.spare_ranks < 1:
            raise ConfigError(f"resilience.spare_ranks={self.spare_ranks} leaves no rank to train: the "
                              f"launcher started {launched} processes (launch the training world size "
                              "plus resilience.spare_ranks)")
        return launched - self.spare_ranks if self.in_process_restart else launched

    def check_against(self, collective_timeout_s: float, watchdog_enabled: bool,
                      watchdog_min_s: float) -> None:
        """The other sections' timeouts, with ``in_process_restart`` on: a collective that waits
        for a lost peer must fail (and so restart) before NVRx's soft timeout interrupts the rank
        that waits, and megasmol's hang watchdog, which ends the process, must not fire first."""
        if not self.in_process_restart:
            return
        if not collective_timeout_s < self.soft_timeout_s:
            raise ConfigError(f"training.collective_timeout_s={collective_timeout_s:g} must be below "
                              f"resilience.soft_timeout_s={self.soft_timeout_s:g} with "
                              "resilience.in_process_restart (a collective waiting on a lost peer "
                              "fails first, and the ranks restart in-process)")
        if watchdog_enabled and not watchdog_min_s > self.hard_timeout_s:
            raise ConfigError(f"watchdog.min_s={watchdog_min_s:g} must be above resilience.hard_timeout_s="
                              f"{self.hard_timeout_s:g} with resilience.in_process_restart (the hang "
                              "watchdog ends the process; NVRx restarts it in place first)")

    def check_local_dir(self, local_dir: Path, checkpoint_dir: Path) -> None:
        """With local copies on: ``local_dir`` (resolved) is not inside ``checkpoint_dir`` (the
        copies would sit among the checkpoints, and be pruned or uploaded as one), and this machine
        can write there."""
        if not self.local_checkpoint_every:
            return
        local, ckpt = local_dir.resolve(), checkpoint_dir.resolve()
        if local == ckpt or ckpt in local.parents:
            raise ConfigError(f"resilience.local_checkpoint_dir={local} is inside the checkpoint "
                              f"directory {ckpt}: choose a node-local directory outside it (default "
                              "/dev/shm)")
        existing = next(p for p in (local, *local.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            what = "is not a directory" if not existing.is_dir() else "is not writable"
            raise ConfigError(f"resilience.local_checkpoint_dir={local}: {existing} {what} here")


def default_local_dir() -> Path:
    """Where local copies go by default: ``/dev/shm`` (RAM), else the temporary directory."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK) else Path(tempfile.gettempdir())
