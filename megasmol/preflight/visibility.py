"""Does torch see the GPUs the node has, and as many as the job needs?

A node where NVML or ``nvidia-smi`` list GPUs but torch sees none is broken (a driver / CUDA
mismatch, a container started without GPU access, a wrong ``CUDA_VISIBLE_DEVICES``): every GPU
check would be skipped there, so this check fails instead of letting the verdict be GO. A job
that needs GPUs (``--expect-gpus N``, or a bf16/fp8 config: one GPU per local rank) fails when
fewer are visible. A CPU-only run (fp32 configs, ``--allow-cpu``) keeps the CPU verdicts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

import torch

from megasmol.preflight.report import CheckResult


def nvml_gpu_count() -> Optional[int]:
    """GPUs the NVIDIA driver reports through NVML, or None when NVML is not there."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no library, or no driver: NVML has nothing to say
        return None


def smi_gpu_count() -> Optional[int]:
    """GPUs ``nvidia-smi -L`` lists, or None when it is not installed or cannot run."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=60)
    except (subprocess.TimeoutExpired, OSError):
        return None
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines())


def required_gpus(expect_gpus: Optional[int], precision: Optional[str], allow_cpu: bool) -> int:
    """GPUs this process's node must show torch: ``--expect-gpus``, else one per local rank for
    a bf16/fp8 config, else none."""
    if expect_gpus is not None:
        return expect_gpus
    if allow_cpu or precision not in ("bf16", "fp8"):
        return 0
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))


def check_gpu_visibility(required: int, why: str) -> CheckResult:
    seen_by_torch = torch.cuda.device_count() if torch.cuda.is_available() else 0
    driver = {"nvml": nvml_gpu_count(), "nvidia-smi": smi_gpu_count()}
    details = {"torch": seen_by_torch, **driver, "required": required,
               "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
               "torch_cuda": torch.version.cuda}
    listed = max((n for n in driver.values() if n), default=0)
    if listed and not seen_by_torch:
        sources = ", ".join(f"{k} sees {n}" for k, n in driver.items() if n)
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        cause = (f"CUDA_VISIBLE_DEVICES={visible!r} hides them" if visible is not None else
                 "driver/CUDA mismatch or a container without GPU access")
        build = (f"torch built for CUDA {torch.version.cuda}" if torch.version.cuda
                 else "a CPU-only torch build")
        return CheckResult("gpu_visibility", "fail",
                           f"{sources} GPU(s) but torch sees none ({build}; {cause}): a broken "
                           "node", details=details)
    if seen_by_torch < required:
        return CheckResult("gpu_visibility", "fail",
                           f"torch sees {seen_by_torch} GPU(s), {why} needs {required}",
                           details=details)
    if not seen_by_torch:
        return CheckResult("gpu_visibility", "skip", "no GPU here, and none is needed (CPU run)",
                           details=details)
    return CheckResult("gpu_visibility", "pass", f"torch sees {seen_by_torch} GPU(s)"
                       + (f", {why} needs {required}" if required else ""), details=details)
