"""Export a megasmol checkpoint to a Hugging Face model directory, tensor by tensor.

Memory stays at one layer's tensor plus one output shard: the checkpoint is read slice by
slice (:class:`~megasmol.ckpt.reader.CheckpointReader`) and shards are flushed as they fill.
Everything is written into ``OUT.partial`` and renamed to ``OUT`` when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from megasmol.ckpt.checkpoint import (
    check_output_dir,
    copy_tokenizer,
    read_metadata,
    replace_directory,
    resolve,
    tokenizer_dir,
)
from megasmol.ckpt.reader import CheckpointReader
from megasmol.config.typed import ConfigError
from megasmol.convert.hf_config import hf_config
from megasmol.convert.mappings import mappings_for, split
from megasmol.errors import OutputExists
from megasmol.model.spec import YarnSpec, model_spec_from_dict
from megasmol.tokenizer import record_decode_cleanup
from megasmol.utils.progress import progress_bar

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportReport:
    out_dir: Path
    tensors: int
    shards: int
    total_bytes: int
    tokenizer: bool


class _ShardWriter:
    def __init__(self, directory: Path, max_bytes: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        # clone: split() returns views into the layer tensor; safetensors needs its own storage.
        self.pending[name] = tensor.contiguous().clone()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, str(self._temp_name(len(self.shards))), metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def _temp_name(self, index: int) -> Path:
        return self.directory / f"shard-{index}.tmp"

    def finish(self) -> None:
        self.flush()
        count = len(self.shards)
        if count == 1:
            self._temp_name(0).rename(self.directory / "model.safetensors")
            return
        weight_map = {}
        for index, names in enumerate(self.shards):
            final = f"model-{index + 1:05d}-of-{count:05d}.safetensors"
            self._temp_name(index).rename(self.directory / final)
            weight_map.update({name: final for name in names})
        index_doc = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.directory / "model.safetensors.index.json").write_text(
            json.dumps(index_doc, indent=2, sort_keys=True)
        )


def export_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: Optional[str] = None,
    yarn: Optional[YarnSpec] = None,
    tokenizer: Optional[str | Path] = None,
    chat_template: Optional[str] = None,
    max_shard_bytes: int = 2 * 1024**3,
    overwrite: bool = False,
    show_progress: bool = True,
) -> ExportReport:
    meta = read_metadata(checkpoint)
    spec = model_spec_from_dict(meta["model_spec"])
    reader = CheckpointReader(checkpoint)
    mappings = mappings_for(spec)
    stored_dtype = reader.dtype(mappings[0].megatron)
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out_dtype = DTYPES[dtype] if dtype else stored_dtype
    config = hf_config(spec, str(out_dtype).removeprefix("torch."), yarn)
    for mapping in mappings:
        shape = reader.shape(mapping.megatron)
        if mapping.per_layer and shape[0] != spec.num_layers:
            raise ConfigError(
                f"{mapping.megatron} has {shape[0]} layers, the model spec {spec.num_layers}"
            )
    vocab = reader.shape("embedding.word_embeddings.weight")[0]
    if vocab != spec.vocab_size:
        raise ConfigError(f"checkpoint vocabulary {vocab} != model spec vocab_size {spec.vocab_size}")

    if max_shard_bytes < 1:
        raise ConfigError("--max-shard-gb must be > 0")
    out = check_output_dir(out_dir, sources=(resolve(checkpoint),) + ((tokenizer,) if tokenizer else ()))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out} exists and is not empty (pass --overwrite to replace it)")
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)

    writer = _ShardWriter(partial, max_shard_bytes)
    global_rows = [m for m in mappings if not m.per_layer]
    layer_rows = [m for m in mappings if m.per_layer]
    total = sum(len(m.hf) for m in global_rows) + spec.num_layers * sum(len(m.hf) for m in layer_rows)
    with progress_bar(total, "export", enabled=show_progress) as bar:
        for mapping in global_rows:
            for name, tensor in zip(mapping.hf, split(mapping, reader.read(mapping.megatron), spec)):
                writer.add(name, tensor.to(out_dtype))
                bar.update(1)
        for layer in range(spec.num_layers):
            for mapping in layer_rows:
                pieces = split(mapping, reader.read(mapping.megatron, layer), spec)
                for name, tensor in zip(mapping.hf, pieces):
                    writer.add(name.format(i=layer), tensor.to(out_dtype))
                    bar.update(1)
    writer.finish()
    source = Path(tokenizer) if tokenizer else tokenizer_dir(checkpoint)
    has_tokenizer = bool(source) and copy_tokenizer(source, partial)
    end_of_turn = None
    if has_tokenizer:
        end_of_turn = apply_chat_template_choice(partial, chat_template)
    elif chat_template is not None:
        raise ConfigError("--chat-template needs a tokenizer to attach it to (the checkpoint has "
                          "none stored: pass --tokenizer)")
    if end_of_turn is not None:
        # A chat model ends its turn with <|im_end|>: that is its EOS for every tool that reads
        # the tokenizer's or the config's (SmolLM3-3B ships the same); generation stops at both.
        config["eos_token_id"] = end_of_turn
        _set_tokenizer_eos(partial, "<|im_end|>")
    if has_tokenizer:
        record_decode_cleanup(partial)  # transformers loads it without a warning
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    eos = spec.eos_token_id if end_of_turn is None else [end_of_turn, spec.eos_token_id]
    generation = {"bos_token_id": spec.bos_token_id, "eos_token_id": eos,
                  "pad_token_id": spec.pad_token_id}
    (partial / "generation_config.json").write_text(json.dumps(generation, indent=2))
    for file in partial.iterdir():  # readable like the rest (safetensors writes 0600)
        if file.is_file():
            file.chmod(0o666 & ~_umask())
    replace_directory(partial, out)
    return ExportReport(out, total, len(writer.shards), writer.total_bytes, has_tokenizer)


def apply_chat_template_choice(tokenizer_dir: Path, choice: Optional[str]) -> Optional[int]:
    """Give the exported tokenizer ``choice`` as its chat template (a name or a file; None keeps
    the one it has) with the chat markers as single tokens; returns the end-of-turn id when the
    tokenizer has a chat template, for generation_config's EOS. Without ``choice`` the files are
    only read, never loaded, so any tokenizer the checkpoint carries is copied as it is."""
    from megasmol.data.messages.special_tokens import added_token_id, write_chat_tokenizer
    from megasmol.data.messages.template import load_template
    from megasmol.tokenizer import load_tokenizer

    if choice is not None:
        template = load_template(choice, load_tokenizer(tokenizer_dir))
        staged = tokenizer_dir / ".chat-tokenizer"
        write_chat_tokenizer(tokenizer_dir, staged, template.source)
        for file in staged.iterdir():
            os.replace(file, tokenizer_dir / file.name)
        staged.rmdir()
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    if not config.get("chat_template") and not (tokenizer_dir / "chat_template.jinja").is_file():
        return None
    return added_token_id(tokenizer_dir, "<|im_end|>")


def _set_tokenizer_eos(tokenizer_dir: Path, token: str) -> None:
    path = tokenizer_dir / "tokenizer_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    settings["eos_token"] = token
    path.write_text(json.dumps(settings, indent=2, ensure_ascii=False))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
