"""Expected throughput (``logging.expected_tokens_per_s_per_gpu``): a sustained drop below a
fraction of it is a red flag (the playbook: a slow node, a throttling GPU, a degraded link), so it
becomes a warning record in ``metrics.jsonl`` and a console line, with the NVML clock and throttle
reasons of the slowest device in the job.

Rank 0 decides from its interval records and tells the others (one broadcast per log interval,
only when an expected figure is set), so every rank joins the gather of NVML samples together.
A warning is given once per episode: throughput must recover before it can warn again.
``ThroughputWatch`` is the decision, ``ThroughputCallback`` its place in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megasmol.runtime.run_dir import Kind
from megasmol.train.callbacks.base import Callback, LoopContext

# NVML clock-event ("throttle") reason bits beyond idle and application-clock settings.
THROTTLE_REASONS = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x10: "sync_boost",
                    0x20: "sw_thermal_slowdown", 0x40: "hw_thermal_slowdown",
                    0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def throttle_names(bits: int) -> list[str]:
    return [name for bit, name in THROTTLE_REASONS.items() if bits & bit]


@dataclass
class ThroughputWatch:
    expected: Optional[float]
    """Expected tokens/s per device (None: no watch)."""
    fraction: float
    window: int
    """Steps the throughput must stay below ``fraction x expected`` before a warning."""
    below_since: Optional[int] = None
    warned: bool = False
    measured: list[float] = field(default_factory=list)

    def observe(self, step: int, steps_in_interval: int, tokens_per_s_per_device: float) -> bool:
        """Rank 0's verdict for the interval ending at ``step``: warn now?"""
        if self.expected is None:
            return False
        if tokens_per_s_per_device >= self.fraction * self.expected:
            self.below_since, self.warned, self.measured = None, False, []
            return False
        if self.below_since is None:
            self.below_since = step - steps_in_interval + 1
        self.measured.append(tokens_per_s_per_device)
        if self.warned or step - self.below_since + 1 < self.window:
            return False
        self.warned = True
        return True

    def check(self, step: int, record: dict, steps_in_interval: int, nvml_sample) -> Optional[dict]:
        """Collective when an expected figure is set: the warning record, or None."""
        if self.expected is None:
            return None
        decision = [self.observe(step, steps_in_interval, record["tokens_per_s_per_device"])]
        distributed = torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1
        if distributed:
            torch.distributed.broadcast_object_list(decision, src=0)
        if not decision[0]:
            return None
        samples = [nvml_sample()]
        if distributed:
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, samples[0])
            samples = gathered
        warning: dict[str, object] = {"step": step, "expected_tokens_per_s_per_device": self.expected,
                   "measured_tokens_per_s_per_device": sum(self.measured) / len(self.measured),
                   "fraction": self.fraction, "below_since_step": self.below_since}
        clocked = [(rank, s) for rank, s in enumerate(samples) if s and "gpu_sm_clock_mhz" in s]
        if clocked:
            rank, slowest = min(clocked, key=lambda item: item[1]["gpu_sm_clock_mhz"])
            warning.update({"slowest_rank": rank, "slowest_sm_clock_mhz": slowest["gpu_sm_clock_mhz"],
                            "slowest_throttle_reasons": throttle_names(slowest["gpu_throttle_reasons"])})
        return warning

    @staticmethod
    def line(warning: dict) -> str:
        expected = warning["expected_tokens_per_s_per_device"]
        text = (f"WARNING throughput {warning['measured_tokens_per_s_per_device']:,.0f} tokens/s per "
                f"device since step {warning['below_since_step']}, below "
                f"{warning['fraction']:.0%} of the expected {expected:,.0f}")
        if "slowest_rank" in warning:
            reasons = ", ".join(warning["slowest_throttle_reasons"]) or "none"
            text += (f"; slowest GPU: rank {warning['slowest_rank']} at "
                     f"{warning['slowest_sm_clock_mhz']} MHz, throttle reasons: {reasons}")
        return text


class ThroughputCallback(Callback):
    name = "throughput"

    def __init__(self, ctx: LoopContext, logging_config, sampler=None):
        """``sampler``: this rank's GPU sampler (``metrics.NvmlSampler``); None: no GPU figures."""
        self.ctx = ctx
        self.watch = ThroughputWatch(logging_config.expected_tokens_per_s_per_gpu,
                                     logging_config.throughput_fraction, logging_config.throughput_window)
        self.sampler = sampler

    def _sample(self) -> dict:
        return self.sampler.sample() if self.sampler is not None else {}

    def on_log(self, record: dict, steps: int) -> None:
        warning = self.watch.check(record["step"], record, steps, self._sample)  # collective
        if warning is not None:
            self.ctx.emit(Kind.THROUGHPUT_WARNING, warning, self.watch.line(warning))
