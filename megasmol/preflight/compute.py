"""Per-device compute checks: a GEMM burn (GPU Fryer's method) and memory bandwidth.

The burn runs large matrix products back to back for a set time and samples the achieved
TFLOP/s about twice a second; on a GPU, NVML is sampled alongside (temperature, SM clock,
throttle reasons). A device fails when it reaches zero FLOP/s, when NVML reports hardware
slowdown or thermal throttling during the burn, or (job level) when its mean is more than the
tolerance below the best device in the job. Without a GPU the same burn measures the CPU.
"""

from __future__ import annotations

import statistics
import time
from typing import Optional

import torch

from megasmol.preflight.report import CheckResult, below_best
from megasmol.runtime.distributed import current_device as device
from megasmol.utils.nvml import current_gpu_handle

# NVML clock-event ("throttle") reason bits that mean the GPU slowed itself down for a fault
# or heat, not for idling or an application clock setting.
THROTTLE_BITS = {
    0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal", 0x80: "hw_power_brake",
}
# Nominal device memory bandwidth (GB/s) by name fragment; the check expects a copy to reach
# ``MEMBW_FRACTION`` of it.
NOMINAL_MEMBW_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))
MEMBW_FRACTION = 0.6


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gemm_burn(seconds: float, size: int, dtype: torch.dtype) -> dict:
    """Burn this rank's device; returns TFLOP/s statistics and what NVML saw."""
    dev = device()
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    out = torch.empty(size, size, device=dev, dtype=dtype)
    flops = 2.0 * size ** 3
    torch.matmul(a, b, out=out)  # warm-up (kernel selection)
    _sync()
    started = time.perf_counter()
    torch.matmul(a, b, out=out)
    _sync()
    per_sample = max(1, int(0.5 / max(time.perf_counter() - started, 1e-6)))
    nvml, handle = current_gpu_handle()
    samples, temps, clocks, reasons = [], [], [], 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(samples) < 3:
        t0 = time.perf_counter()
        for _ in range(per_sample):
            torch.matmul(a, b, out=out)
        _sync()
        samples.append(per_sample * flops / (time.perf_counter() - t0) / 1e12)
        if handle is not None:
            try:
                temps.append(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                clocks.append(nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM))
                reasons |= int(nvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))
            except Exception:
                handle = None
    return {
        "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev),
        "size": size, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
        "samples": len(samples),
        "mean_tflops": statistics.fmean(samples), "min_tflops": min(samples),
        "std_tflops": statistics.pstdev(samples),
        "max_temp_c": max(temps) if temps else None, "min_sm_clock_mhz": min(clocks) if clocks else None,
        "throttle": [name for bit, name in THROTTLE_BITS.items() if reasons & bit],
    }


def timed_matmuls(size: int, dtype: torch.dtype, iterations: int) -> float:
    """Seconds for ``iterations`` plain ``torch.matmul`` calls of [size, size] (after a warm-up)."""
    dev = device()
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    torch.matmul(a, b)
    _sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
        torch.matmul(a, b)
    _sync()
    return time.perf_counter() - t0


def matmul_reference(size: int, dtype: torch.dtype, iterations: int = 10) -> float:
    """A plain ``torch.matmul`` timing in TFLOP/s, to compare the burn figure with."""
    return iterations * 2.0 * size ** 3 / timed_matmuls(size, dtype, iterations) / 1e12


def judge_burns(burns: dict[str, dict], tolerance: float) -> list[CheckResult]:
    """One row per device: fail on zero FLOP/s, throttling, or falling behind the job's best."""
    slow = set(below_best({k: v["mean_tflops"] for k, v in burns.items()}, tolerance))
    best = max(v["mean_tflops"] for v in burns.values())
    rows = []
    for target, burn in burns.items():
        problems = []
        if burn["mean_tflops"] <= 0 or burn["min_tflops"] <= 0:
            problems.append("zero FLOP/s")
        if burn["throttle"]:
            problems.append("throttled: " + ",".join(burn["throttle"]))
        if target in slow:
            problems.append(f"{100 * (1 - burn['mean_tflops'] / best):.0f}% below the best device")
        temp = f", max {burn['max_temp_c']}C" if burn["max_temp_c"] is not None else ""
        clock = f", min SM {burn['min_sm_clock_mhz']} MHz" if burn["min_sm_clock_mhz"] else ""
        summary = (f"{burn['mean_tflops']:.1f} TFLOP/s mean (min {burn['min_tflops']:.1f}, "
                   f"std {burn['std_tflops']:.2f}) {burn['dtype']} {burn['size']}^3 on "
                   f"{burn['device']}{temp}{clock}")
        if burn.get("plain_matmul_tflops"):
            summary += f"; plain torch.matmul {burn['plain_matmul_tflops']:.1f}"
        if problems:
            summary += " -- " + "; ".join(problems)
        rows.append(CheckResult("gemm", "fail" if problems else "pass", summary, target, burn))
    return rows


def memory_bandwidth(megabytes: int, iterations: int = 10) -> dict:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    dev = device()
    count = megabytes * 1024 * 1024 // 4
    src = torch.empty(count, device=dev, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync()
    t0 = time.perf_counter()
    for _ in range(iterations):
        dst.copy_(src)
    _sync()
    seconds = time.perf_counter() - t0
    return {"bytes": 4 * count, "gbps": 2 * 4 * count * iterations / seconds / 1e9,
            "device": str(dev) if dev.type == "cpu" else torch.cuda.get_device_name(dev)}


def judge_bandwidth(target: str, result: dict, min_gbps: Optional[float]) -> CheckResult:
    threshold = min_gbps
    if threshold is None:
        for fragment, nominal in NOMINAL_MEMBW_GBPS:
            if fragment in result["device"]:
                threshold = MEMBW_FRACTION * nominal
                break
    summary = f"{result['gbps']:.1f} GB/s copy (read + write) on {result['device']}"
    if threshold is None:
        return CheckResult("memory_bandwidth", "pass", summary + " (no threshold for this device)",
                           target, result)
    result["threshold_gbps"] = threshold
    ok = result["gbps"] >= threshold
    return CheckResult("memory_bandwidth", "pass" if ok else "fail",
                       summary + f" ({'>=' if ok else '<'} {threshold:.0f} GB/s)", target, result)
