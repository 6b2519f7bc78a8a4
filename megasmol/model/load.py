"""A whole model in one process, from a checkpoint (for generate, eval and import)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from megasmol.ckpt.checkpoint import load_model_weights, read_metadata
from megasmol.ckpt.reader import CheckpointReader
from megasmol.config.parallel import ParallelLayout
from megasmol.model.gpt import SmolGPTModel, build_model
from megasmol.model.spec import ModelSpec, model_spec_from_dict
from megasmol.runtime.distributed import init_parallel

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")


def single_process_model(spec: ModelSpec, params_dtype=torch.float32,
                         initialize: bool = True) -> SmolGPTModel:
    init_parallel(ParallelLayout(), spec)
    return build_model(spec, params_dtype=params_dtype, initialize=initialize)


def yarn_overrides(path: str | Path, factor: Optional[float]) -> Optional[dict]:
    """Spec changes that run a checkpoint with YaRN scaled by ``factor`` over its trained length."""
    if not factor or factor <= 1.0:
        return None
    from megasmol.model.spec import YarnSpec

    original = read_metadata(path)["model_spec"]["max_position_embeddings"]
    yarn = YarnSpec(factor=factor, original_max_position_embeddings=original)
    return {"yarn": yarn.__dict__, "max_position_embeddings": int(original * factor)}


def load_checkpoint_model(
    path: str | Path, *, overrides: Optional[dict] = None, params_dtype=None,
    layout: Optional[ParallelLayout] = None,
) -> tuple[SmolGPTModel, ModelSpec, dict]:
    """The checkpoint's model in eval mode, whatever layout wrote it: whole (TP=1, PP=1), or
    under torchrun this rank's chunk of ``layout``."""
    meta = read_metadata(path)
    spec = model_spec_from_dict(meta["model_spec"])
    if overrides:
        spec = spec.replace(**overrides)
    if params_dtype is None:
        params_dtype = CheckpointReader(path).dtype("embedding.word_embeddings.weight")
    if layout is None:
        model = single_process_model(spec, params_dtype, initialize=False)
    else:
        init_parallel(layout, spec)
        model = build_model(spec, params_dtype=params_dtype, initialize=False)
    load_model_weights(model, path)
    model.eval()
    return model, spec, meta


def canonical_parameters(model) -> dict[tuple[str, Optional[int]], torch.Tensor]:
    """(canonical checkpoint key, layer or None) -> this rank's parameter tensor."""
    targets = {}
    for local_name, sharded in model.sharded_state_dict().items():
        if local_name.endswith("_extra_state"):
            continue
        match = _LAYER.match(local_name)
        targets[(sharded.key, int(match.group(1)) if match else None)] = sharded.data
    return targets
