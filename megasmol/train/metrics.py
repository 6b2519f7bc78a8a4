"""What a log interval reports: one console line, one JSONL record, TensorBoard scalars.

MFU = achieved model FLOP/s per device / the device's peak dense FLOP/s, with model FLOPs per
token from ``model/flops.py`` (the same function planning and pre-flight use).
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megasmol.runtime.run_dir import Kind, RunDir

if TYPE_CHECKING:
    from megasmol.train.setup import TrainingSetup

log = logging.getLogger(__name__)

# Peak dense TFLOP/s per device by name fragment and precision (NVIDIA datasheets, without
# sparsity). The first matching fragment wins, so more specific names come first.
PEAK_TFLOPS = (
    ("H200", {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("GH200", {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0}),
    ("A100", {"bf16": 312.0, "fp8": 312.0, "fp32": 19.5}),
)


def device_peak_tflops(precision: str, override: Optional[float] = None) -> Optional[float]:
    """Peak per-device TFLOP/s for MFU: the configured value, a known GPU's, or None (CPU)."""
    if override is not None:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for fragment, peaks in PEAK_TFLOPS:
        if fragment in name:
            return peaks[precision]
    log.warning("no peak FLOP/s known for %s; set logging.peak_tflops to get MFU", name)
    return None


def memory_gb() -> float:
    """Peak device memory allocated since the last call (GPU), or resident memory (CPU)."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 1e9
        torch.cuda.reset_peak_memory_stats()
        return peak
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class NvmlSampler:
    """Per-GPU temperature, utilization, SM clock and throttle reasons (this rank's GPU)."""

    def __init__(self):
        from megasmol.utils.nvml import current_gpu_handle

        self.nvml, self.handle = current_gpu_handle()

    def sample(self) -> dict:
        if self.handle is None:
            return {}
        n, h = self.nvml, self.handle
        try:
            reasons = n.nvmlDeviceGetCurrentClocksThrottleReasons(h)
            return {
                "gpu_temp_c": n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU),
                "gpu_util_pct": n.nvmlDeviceGetUtilizationRates(h).gpu,
                "gpu_sm_clock_mhz": n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM),
                "gpu_power_w": n.nvmlDeviceGetPowerUsage(h) / 1000.0,
                # Anything beyond idle / application-clock settings means the GPU slowed itself.
                "gpu_throttle_reasons": int(reasons) & ~0x3,
            }
        except Exception:
            return {}


@dataclass
class IntervalStats:
    """Accumulates step results between two log lines."""

    steps: int = 0
    loss_sum: float = 0.0
    loss_steps: int = 0
    grad_norm_sum: float = 0.0
    grad_norm_steps: int = 0
    tokens: int = 0
    skipped: int = 0
    nan: int = 0
    spikes: int = 0
    started: float = field(default_factory=time.perf_counter)
    metric_sums: dict = field(default_factory=dict)
    """The objective's metrics (e.g. ``rewards/margins``) summed over the steps that had them."""
    metric_steps: int = 0
    metric_extremes: dict = field(default_factory=dict)
    """Metrics named as a maximum or minimum (``clip_ratio/high_max``, ``logps/rollout_max_diff``):
    the interval's extreme."""

    def exclude(self, seconds: float) -> None:
        """Time spent outside the steps (validation, evaluation, saving): not step time."""
        self.started += seconds

    def add(self, loss: Optional[float], grad_norm: Optional[float], tokens: int,
            metrics: Optional[dict] = None) -> None:
        self.steps += 1
        self.tokens += tokens
        if metrics:
            self.metric_steps += 1
            for key, value in metrics.items():
                if key.endswith(_EXTREME):  # the interval's largest / smallest, not a mean
                    pick = max if key.endswith(_MAX) else min
                    self.metric_extremes[key] = pick(self.metric_extremes.get(key, value), value)
                else:
                    self.metric_sums[key] = self.metric_sums.get(key, 0.0) + value
        if loss is not None and math.isfinite(loss):
            self.loss_sum += loss
            self.loss_steps += 1
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norm_sum += grad_norm
            self.grad_norm_steps += 1


_MAX = ("_max", "_max_diff", "max_length")
_EXTREME = _MAX + ("_min", "min_length")


def _mean(total: float, count: int) -> Optional[float]:
    return total / count if count else None


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class MetricsLog:
    """Rank 0's metric sinks; other ranks hold an inactive instance."""

    def __init__(self, run_dir: Path, *, active: bool, jsonl: bool, flops_per_token: float,
                 world_size: int, peak_tflops: Optional[float], nvml: bool, trackers=None):
        """``trackers``: a callable giving rank 0's trackers (``trackers.build_trackers``)."""
        self.active = active
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.nvml = NvmlSampler() if nvml and active else None
        self.jsonl = None
        self.trackers = []
        if active:
            run_dir.mkdir(parents=True, exist_ok=True)
            if jsonl:
                self.jsonl = open(RunDir(run_dir).metrics, "a", buffering=1)
            if trackers is not None:
                self.trackers = trackers()

    def interval_record(self, step: int, last_step: int, stage: str, lr: float, stats: IntervalStats,
                        run_started: float, steps_done: int, consumed_tokens: int) -> dict:
        elapsed = time.perf_counter() - stats.started
        tokens_per_s = stats.tokens / elapsed if elapsed > 0 else 0.0
        record = {
            "step": step, "stage": stage, "lr": lr,
            "loss": _mean(stats.loss_sum, stats.loss_steps),
            "grad_norm": _mean(stats.grad_norm_sum, stats.grad_norm_steps),
            "tokens": stats.tokens,
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": tokens_per_s / self.world_size,
            "step_time_s": elapsed / max(stats.steps, 1),
            "memory_gb": memory_gb(),
            "skipped_steps": stats.skipped, "nan_steps": stats.nan, "spikes": stats.spikes,
        }
        record.update({k: v / stats.metric_steps for k, v in stats.metric_sums.items()})
        record.update(stats.metric_extremes)
        generation = stats.metric_sums.get("time/generation_s")
        if generation is not None:  # RL: the share of the step spent sampling
            step_time = elapsed / max(stats.steps, 1)
            record["time/generation_share"] = generation / stats.metric_steps / max(step_time, 1e-9)
        if self.peak_tflops:
            achieved = tokens_per_s / self.world_size * self.flops_per_token
            record["mfu"] = achieved / (self.peak_tflops * 1e12)
        if self.nvml is not None:
            record.update(self.nvml.sample())
        per_step = (time.perf_counter() - run_started) / max(steps_done, 1)
        record["eta_s"] = per_step * (last_step - step)
        record["consumed_tokens"] = consumed_tokens
        return record

    def console_line(self, record: dict, last_step: int) -> str:
        clock = time.strftime("%H:%M:%S")
        parts = [f"{clock} step {record['step']:>{len(str(last_step))}}/{last_step}", record["stage"]]
        if record.get("loss") is not None:
            parts.append(f"loss {record['loss']:.4f}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad {record['grad_norm']:.3f}")
        if record.get("reward") is not None:
            parts.append(f"reward {record['reward']:.3f} (std {record['reward_std']:.3f}) len "
                         f"{record['completions/mean_length']:.0f}")
            if record.get("entropy") is not None:
                parts.append(f"entropy {record['entropy']:.2f}")
            if record.get("logps/rollout_max_diff") is not None:
                parts.append(f"on-policy {record['logps/rollout_max_diff']:.1e}")
            if record.get("time/generation_share") is not None:
                parts.append(f"gen {100 * record['time/generation_share']:.0f}%")
        if record.get("rewards/accuracies") is not None:
            parts.append(f"reward acc {record['rewards/accuracies']:.2f} "
                         f"margin {record['rewards/margins']:.3f}")
        parts.append(f"lr {record['lr']:.2e}")
        tps = record["tokens_per_s"]
        parts.append(f"{tps / 1e3:.1f}k tok/s ({record['tokens_per_s_per_device'] / 1e3:.1f}k/dev)")
        if "mfu" in record:
            parts.append(f"mfu {100 * record['mfu']:.1f}%")
        parts.append(f"{record['step_time_s']:.2f} s/step")
        parts.append(f"mem {record['memory_gb']:.1f} GB")
        if record["skipped_steps"] or record["nan_steps"] or record["spikes"]:
            parts.append(f"skipped {record['skipped_steps']} nan {record['nan_steps']} "
                         f"spikes {record['spikes']}")
        if "gpu_temp_c" in record:
            parts.append(f"gpu {record['gpu_temp_c']}C {record['gpu_sm_clock_mhz']}MHz "
                         f"util {record['gpu_util_pct']}%"
                         + (f" THROTTLE 0x{record['gpu_throttle_reasons']:x}"
                            if record["gpu_throttle_reasons"] else ""))
        parts.append(f"eta {_duration(record['eta_s'])}")
        return " | ".join(parts)

    def write(self, record: dict, kind: str = Kind.TRAIN) -> None:
        if not self.active:
            return
        if self.jsonl is not None:
            stamped = {"kind": kind, "time": _utc_now(), **record}
            self.jsonl.write(json.dumps(strict_json_record(stamped), allow_nan=False) + "\n")
        for tracker in self.trackers:
            tracker.log(kind, record)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        for tracker in self.trackers:
            tracker.close()


def open_metrics(setup: TrainingSetup, run_dir: Path) -> MetricsLog:
    """The run's metric sinks (rank 0's; inert elsewhere), with the FLOPs and peak for MFU."""
    from megasmol.model.flops import flops_per_token
    from megasmol.train.trackers import build_trackers

    config = setup.config
    seq = max(p.seq_length for p in setup.batches.plans)
    return MetricsLog(
        run_dir, active=setup.is_logging_rank, jsonl=config.logging.jsonl,
        trackers=lambda: build_trackers(config.logging, run_dir, config.to_dict()),
        flops_per_token=flops_per_token(setup.spec, seq), world_size=setup.rank.world_size,
        peak_tflops=device_peak_tflops(config.training.precision, config.logging.peak_tflops),
        nvml=config.logging.nvml)


def _utc_now() -> str:
    """When a record was written: ISO 8601, UTC, to the second (``2026-12-03T13:12:00+00:00``)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def strict_json_record(record: dict) -> dict:
    """NaN and inf become null (strict JSON readers reject them), and ``nonfinite`` lists the
    keys whose value was not finite."""
    out: dict = {}
    bad: list[str] = []
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            bad.append(key)
        else:
            out[key] = value
    if bad:
        out["nonfinite_keys"] = bad
    return out
