"""Import a Hugging Face SmolLM3 / Llama-family model into a megasmol checkpoint.

Reads safetensors only (never unpickles), one tensor at a time, checks every name and shape
against the architecture in config.json before writing, and stores the tokenizer files found
in the HF directory with the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from megasmol.ckpt.checkpoint import CheckpointError, check_output_dir, save_checkpoint
from megasmol.config.typed import ConfigError
from megasmol.convert.hf_config import spec_from_hf_config
from megasmol.convert.mappings import expected_hf_shapes, fuse, mappings_for
from megasmol.model.load import canonical_parameters, single_process_model
from megasmol.utils.progress import progress_bar

# Buffers some HF checkpoints carry that are recomputed, not learned.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class _SafetensorsIndex:
    """Name -> file for a single or sharded safetensors checkpoint, opened lazily."""

    def __init__(self, hf_dir: Path):
        index = hf_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc!r})") from None
            self.files = {name: hf_dir / file for name, file in weight_map.items()}
        else:
            files = sorted(hf_dir.glob("*.safetensors"))
            if not files:
                pickled = [p.name for p in hf_dir.glob("*.bin")] + [p.name for p in hf_dir.glob("*.pt")]
                hint = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
                raise CheckpointError(f"{hf_dir}: no *.safetensors files{hint}")
            self.files = {}
            for file in files:
                with _opened(file) as handle:
                    self.files.update({name: file for name in handle.keys()})
        missing_files = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing_files:
            raise CheckpointError(f"missing safetensors file(s): {', '.join(missing_files)}")
        self._handles: dict[Path, object] = {}

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handle(name).get_tensor(name)
        except Exception as exc:  # safetensors' own error type
            raise CheckpointError(f"{self.files[name]}: cannot read {name}: {exc}") from None

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = _opened(file)
        return self._handles[file]


def _opened(file: Path):
    """``safe_open`` with a truncated or garbled file reported as one line naming it."""
    try:
        return safe_open(str(file), "pt")
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from None


def import_hf(
    hf_dir: str | Path, out_root: str | Path, *, name: Optional[str] = None,
    show_progress: bool = True,
) -> Path:
    hf_dir = Path(hf_dir)
    check_output_dir(out_root, sources=(hf_dir,))
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{config_path}: no such file")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config_path}: not valid JSON ({exc})") from None
    spec = spec_from_hf_config(config, name or hf_dir.name)
    weights = _SafetensorsIndex(hf_dir)

    expected = expected_hf_shapes(spec)
    present = {n for n in weights.files if not n.endswith(_IGNORED_SUFFIXES)}
    if spec.tie_embeddings:
        present.discard("lm_head.weight")
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    if missing:
        raise CheckpointError(f"{hf_dir}: missing tensors for {spec.architecture}: {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{hf_dir}: tensors this architecture does not have: {_few(unexpected)}")
    for tensor_name, shape in expected.items():
        actual = weights.shape(tensor_name)
        if actual != shape:
            what = "vocabulary size" if "embed_tokens" in tensor_name or "lm_head" in tensor_name else "shape"
            raise CheckpointError(
                f"{hf_dir}: {tensor_name} has shape {list(actual)}, config.json implies "
                f"{list(shape)} ({what} mismatch)"
            )

    params_dtype = weights.get("model.norm.weight").dtype
    model = single_process_model(spec, params_dtype, initialize=False)
    targets = canonical_parameters(model)
    mappings = mappings_for(spec)
    total = sum(spec.num_layers if m.per_layer else 1 for m in mappings)
    with torch.no_grad(), progress_bar(total, "import", enabled=show_progress) as bar:
        for mapping in mappings:
            layers = range(spec.num_layers) if mapping.per_layer else [None]
            for layer in layers:
                names = [n.format(i=layer) for n in mapping.hf]
                fused = fuse(mapping, [weights.get(n) for n in names], spec)
                targets[(mapping.megatron, layer)].copy_(fused)
                bar.update(1)
    metadata = {"model_spec": spec.to_dict(), "imported_from": str(hf_dir.resolve()),
                "params_dtype": str(params_dtype).removeprefix("torch.")}
    return save_checkpoint(model, out_root, 0, metadata, tokenizer_source=hf_dir)


def _few(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
