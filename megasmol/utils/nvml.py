"""The NVML handle of this process's GPU, for metrics and pre-flight.

NVML numbers GPUs physically while CUDA numbers the visible ones (``CUDA_VISIBLE_DEVICES``, as
Slurm sets per task), so the handle is looked up through torch's mapping, not the CUDA ordinal.
"""

from __future__ import annotations

import torch


def current_gpu_handle():
    """(pynvml module, handle) for the current CUDA device, or (None, None) without GPU/NVML."""
    if not torch.cuda.is_available():
        return None, None
    try:
        import pynvml

        pynvml.nvmlInit()
        ordinal = torch.cuda.current_device()
        index = torch.cuda._get_nvml_device_index(ordinal) if hasattr(
            torch.cuda, "_get_nvml_device_index") else ordinal
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no driver or library: callers report without NVML
        return None, None
