"""NVIDIA Resiliency Extension heartbeats after each step (``watchdog.nvrx_heartbeats``), so
``ft_launcher`` restarts a rank that stops beating."""

from __future__ import annotations

from megasmol.train.callbacks.base import Callback
from megasmol.train.nvrx import NvrxHeartbeats


class HeartbeatsCallback(Callback):
    priority = 21
    name = "nvrx_heartbeats"

    def __init__(self, heartbeats: NvrxHeartbeats):
        self.heartbeats = heartbeats

    def on_step_end(self, step: int) -> None:
        self.heartbeats.beat()

    def close(self, stopped_by_signal: bool = False, peers_lost: bool = False) -> None:
        self.heartbeats.close()
