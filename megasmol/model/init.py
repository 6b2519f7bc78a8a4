"""``megasmol init``: a randomly initialized checkpoint under any parallel layout."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from megasmol.ckpt.checkpoint import check_output_dir, save_checkpoint
from megasmol.config.parallel import ParallelLayout
from megasmol.model.gpt import build_model
from megasmol.model.spec import ModelSpec
from megasmol.runtime.distributed import init_parallel


def init_checkpoint(
    spec: ModelSpec,
    out: str | Path,
    *,
    layout: Optional[ParallelLayout] = None,
    seed: int = 1234,
    params_dtype: torch.dtype = torch.float32,
    cpu_initialization: bool = False,
    tokenizer: Optional[str | Path] = None,
) -> Path:
    """Collective under torchrun: each rank builds and saves its shard."""
    check_output_dir(out)
    layout = layout or ParallelLayout()
    init_parallel(layout, spec, seed=seed)
    model = build_model(spec, params_dtype=params_dtype, cpu_initialization=cpu_initialization)
    metadata = {
        "model_spec": spec.to_dict(),
        "seed": seed,
        "params_dtype": str(params_dtype).removeprefix("torch."),
        "written_with": {"tensor_parallel": layout.tensor_parallel,
                         "pipeline_parallel": layout.pipeline_parallel},
    }
    return save_checkpoint(model, out, 0, metadata, tokenizer_source=tokenizer)
