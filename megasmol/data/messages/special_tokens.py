"""The chat tokenizer: the Llama-3.2 vocabulary with SmolLM3's names for reserved special tokens.

SmolLM3 keeps Llama-3.2's 128,256 ids and gives some of its reserved special tokens chat roles,
so each marker is one token and the embedding table does not grow. The ids follow SmolLM3's
``tokenizer_config.json`` (HuggingFaceTB/SmolLM3-3B): ``<|im_start|>`` 128011, ``<|im_end|>``
128012, ``<think>`` / ``</think>`` 128002 / 128003, and the tool and code markers 128013-128018.
A tokenizer that already has ``<|im_start|>`` and ``<|im_end|>`` as single tokens is kept as is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from megasmol.config.typed import ConfigError

SMOLLM3_NAMES = {
    128002: "<think>", 128003: "</think>",
    128011: "<|im_start|>", 128012: "<|im_end|>",
    128013: "<tool_response>", 128014: "</tool_response>",
    128015: "<tool_call>", 128016: "</tool_call>",
    128017: "<code>", 128018: "</code>",
}
CHAT_MARKERS = ("<|im_start|>", "<|im_end|>")


def single_token_id(tokenizer, text: str):
    """The id of ``text`` when the tokenizer encodes it as exactly one token, else None."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def has_chat_markers(tokenizer) -> bool:
    return all(single_token_id(tokenizer, m) is not None for m in CHAT_MARKERS)


def _rename_reserved(directory: Path) -> None:
    tok_json = directory / "tokenizer.json"
    data = json.loads(tok_json.read_text())
    by_id = {t["id"]: t for t in data.get("added_tokens", [])}
    for token_id, name in SMOLLM3_NAMES.items():
        entry = by_id.get(token_id)
        if entry is None or not entry["content"].startswith("<|reserved_special_token_"):
            raise ConfigError(f"tokenizer {directory}: id {token_id} is not a reserved special token "
                              f"({entry and entry['content']!r}); it cannot be named {name}")
        entry["content"] = name
    tok_json.write_text(json.dumps(data, ensure_ascii=False))
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        decoder = config.get("added_tokens_decoder", {})
        for token_id, name in SMOLLM3_NAMES.items():
            if str(token_id) in decoder:
                decoder[str(token_id)]["content"] = name
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def added_token_id(directory: Path, content: str):
    """The id of the added (special) token ``content`` in a saved tokenizer, read from its files."""
    tok_json = Path(directory) / "tokenizer.json"
    if tok_json.is_file():
        for token in json.loads(tok_json.read_text()).get("added_tokens", []):
            if token.get("content") == content:
                return token["id"]
    config_path = Path(directory) / "tokenizer_config.json"
    if config_path.is_file():
        decoder = json.loads(config_path.read_text()).get("added_tokens_decoder", {})
        for token_id, token in decoder.items():
            if token.get("content") == content:
                return int(token_id)
    return None


def _named_in_file(directory: Path) -> bool:
    data = json.loads((directory / "tokenizer.json").read_text())
    names = {t["content"] for t in data.get("added_tokens", [])}
    return all(marker in names for marker in CHAT_MARKERS)


def set_chat_template(directory: Path, template_source: str) -> None:
    """Store ``template_source`` as the ``chat_template`` of the tokenizer saved in ``directory``."""
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config["chat_template"] = template_source
    tmp = config_path.with_name(config_path.name + ".partial")
    tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, config_path)
    (Path(directory) / "chat_template.jinja").unlink(missing_ok=True)


def write_chat_tokenizer(source: str | Path | None, dest: Path, chat_template: str | None = None):
    """Save ``source``'s tokenizer (default: the bundled Llama-3.2 one) to ``dest`` with the chat
    markers as single tokens and ``chat_template`` as its template; returns it loaded. Written
    under a temporary name and renamed, so ``dest`` is whole or absent."""
    from megasmol.ckpt.checkpoint import copy_tokenizer
    from megasmol.tokenizer import default_tokenizer_dir, load_tokenizer, record_decode_cleanup

    source = source or default_tokenizer_dir()
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".partial-", dir=dest.parent))
    try:
        if not (Path(source).is_dir() and (Path(source) / "tokenizer.json").is_file()
                and copy_tokenizer(source, tmp)):
            load_tokenizer(source).save_pretrained(str(tmp))
        if not _named_in_file(tmp):
            _rename_reserved(tmp)
        if chat_template is not None:
            set_chat_template(tmp, chat_template)
        record_decode_cleanup(tmp)
        result = load_tokenizer(tmp)
        if not has_chat_markers(result):
            raise ConfigError(f"tokenizer {source}: <|im_start|> / <|im_end|> are not single tokens "
                              "after naming the reserved ids")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def open_chat_tokenizer(source, dest: Path, template: str, now, *, need_marks: bool, why: str,
                        otherwise: str):
    """Write the chat tokenizer to ``dest`` (a ``.partial`` name) with ``template`` as its
    ``chat_template``; returns (tokenizer, template, EOS id). A bad template name or file fails
    first, before any tokenizer work; ``dest`` is removed on failure."""
    from megasmol.data.messages.template import load_template

    if template != "tokenizer":
        load_template(template)
    chat_tokenizer = write_chat_tokenizer(source, dest)
    try:
        chosen = load_template(template, chat_tokenizer, now=now)
        if need_marks and not chosen.marks_generation:
            raise ConfigError(f"chat template {chosen.name} marks no assistant text ({{% generation %}} "
                              f"... {{% endgeneration %}}), so {why} cannot come from it; {otherwise}")
        eos_id = chat_tokenizer.eos_token_id
        if eos_id is None:
            raise ConfigError(f"tokenizer {source}: has no EOS token to end documents with")
        set_chat_template(dest, chosen.source)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return chat_tokenizer, chosen, int(eos_id)
