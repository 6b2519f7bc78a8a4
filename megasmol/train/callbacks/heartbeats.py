"""NVIDIA Resiliency Extension (NVRx) heartbeats, for jobs started by its ``ft_launcher``
(``watchdog.nvrx_heartbeats``).

``ft_launcher`` (a torchrun-compatible launcher from ``nvidia-resiliency-ext``, the optional extra
``megasmol[nvrx]``) starts a rank monitor beside every rank; a rank that stops sending heartbeats
for ``--ft-rank-heartbeat-timeout`` seconds is terminated and the workload restarted, which resumes
from the last checkpoint. With ``watchdog.nvrx_heartbeats: true`` every rank sends one heartbeat
at the end of each training step. megasmol's own watchdog (``hang.py``) works without any of this.
"""

from __future__ import annotations

import os

from megasmol.config.typed import ConfigError
from megasmol.train.callbacks.base import Callback

MONITOR_SOCKET_ENV = "FT_RANK_MONITOR_IPC_SOCKET"  # set by ft_launcher for each rank


class NvrxHeartbeats(Callback):
    name = "nvrx_heartbeats"

    def __init__(self, enabled: bool):
        self.client = None
        """NVRx's ``RankMonitorClient`` (None: heartbeats off)."""
        if not enabled:
            return
        if not os.environ.get(MONITOR_SOCKET_ENV):
            raise ConfigError("watchdog.nvrx_heartbeats is set but this rank has no NVRx rank monitor "
                              f"({MONITOR_SOCKET_ENV} is unset): start the job with ft_launcher")
        try:
            from nvidia_resiliency_ext.fault_tolerance import RankMonitorClient
        except ImportError:
            raise ConfigError("watchdog.nvrx_heartbeats needs nvidia-resiliency-ext "
                              "(pip install 'megasmol[nvrx]')") from None
        self.client = RankMonitorClient()
        self.client.init_workload_monitoring()

    def on_step_end(self, step: int) -> None:
        if self.client is not None:
            self.client.send_heartbeat()

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        if self.client is not None:
            self.client.shutdown_workload_monitoring()
            self.client = None
