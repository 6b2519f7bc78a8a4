"""NVML health of this rank's GPU: ECC, retired pages / row remapping, heat, power, PCIe link,
persistence mode and the driver version (compared across the job)."""

from __future__ import annotations

from typing import Optional

import torch

from megasmol.preflight.report import CheckResult, skipped
from megasmol.utils.nvml import current_gpu_handle


def _call(fn, *args):
    try:
        return fn(*args)
    except Exception:  # NVMLError_NotSupported and friends: not every GPU reports everything
        return None


def read_health() -> Optional[dict]:
    """Raw NVML readings for this rank's GPU, or None without a GPU / NVML."""
    n, h = current_gpu_handle()
    if h is None:
        return None
    remap = _call(n.nvmlDeviceGetRemappedRows, h)
    driver = _call(n.nvmlSystemGetDriverVersion)
    return {
        "name": _call(n.nvmlDeviceGetName, h),
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "ecc_uncorrected": _call(n.nvmlDeviceGetTotalEccErrors, h,
                                 n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC),
        "retired_pages_pending": _call(n.nvmlDeviceGetRetiredPagesPendingStatus, h),
        "row_remap_pending": remap[2] if remap else None,
        "row_remap_failure": remap[3] if remap else None,
        "temp_c": _call(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU),
        "temp_slowdown_c": _call(n.nvmlDeviceGetTemperatureThreshold, h,
                                 n.NVML_TEMPERATURE_THRESHOLD_SLOWDOWN),
        "power_w": (_call(n.nvmlDeviceGetPowerUsage, h) or 0) / 1000 or None,
        "power_limit_w": (_call(n.nvmlDeviceGetEnforcedPowerLimit, h) or 0) / 1000 or None,
        "pcie_gen": _call(n.nvmlDeviceGetCurrPcieLinkGeneration, h),
        "pcie_gen_max": _call(n.nvmlDeviceGetMaxPcieLinkGeneration, h),
        "pcie_width": _call(n.nvmlDeviceGetCurrPcieLinkWidth, h),
        "pcie_width_max": _call(n.nvmlDeviceGetMaxPcieLinkWidth, h),
        "persistence_mode": _call(n.nvmlDeviceGetPersistenceMode, h),
    }


def judge_health(target: str, health: Optional[dict]) -> CheckResult:
    if health is None:
        return skipped("nvml", "no GPU" if not torch.cuda.is_available() else "NVML unavailable", target)
    fails, warns = [], []
    if health["ecc_uncorrected"]:
        fails.append(f"{health['ecc_uncorrected']} uncorrected ECC errors")
    if health["retired_pages_pending"]:
        fails.append("retired pages pending (reset the GPU)")
    if health["row_remap_failure"]:
        fails.append("row remapping failed")
    if health["row_remap_pending"]:
        warns.append("row remapping pending (reset the GPU)")
    temp, slowdown = health["temp_c"], health["temp_slowdown_c"]
    if temp is not None and slowdown is not None and temp >= slowdown - 5:
        warns.append(f"{temp}C is within 5C of the slowdown threshold {slowdown}C")
    if health["pcie_width"] and health["pcie_width_max"] and health["pcie_width"] < health["pcie_width_max"]:
        warns.append(f"PCIe x{health['pcie_width']} of x{health['pcie_width_max']}")
    if health["pcie_gen"] and health["pcie_gen_max"] and health["pcie_gen"] < health["pcie_gen_max"]:
        warns.append(f"PCIe gen {health['pcie_gen']} of {health['pcie_gen_max']} (idle GPUs may "
                     "downshift; checked after the burn)")
    if health["persistence_mode"] == 0:
        warns.append("persistence mode off")
    power = f"{health['power_w'] or 0:.0f}/{health['power_limit_w'] or 0:.0f} W"
    summary = (f"{health['name']}: {temp}C, {power}, "
               f"PCIe gen {health['pcie_gen']} x{health['pcie_width']}, driver {health['driver']}")
    if fails or warns:
        summary += " -- " + "; ".join(fails + warns)
    return CheckResult("nvml", "fail" if fails else "warn" if warns else "pass", summary, target, health)


def judge_drivers(healths: dict[str, Optional[dict]]) -> Optional[CheckResult]:
    drivers = {t: h["driver"] for t, h in healths.items() if h and h.get("driver")}
    if len(drivers) < 2:
        return None
    versions = sorted(set(drivers.values()))
    if len(versions) == 1:
        return CheckResult("nvml", "pass", f"driver {versions[0]} on all {len(drivers)} GPUs", "job")
    return CheckResult("nvml", "fail", "driver versions differ: " + ", ".join(
        f"{t}={v}" for t, v in sorted(drivers.items())), "job", {"drivers": drivers})
