"""The on-disk prompt set that ``prepare-prompts`` writes and RL reads (``PREFIX`` is ``--out``):

* ``PREFIX.prompts.jsonl`` -- one JSON object a line, one line a prompt, in input order:
  ``{"prompt_ids": [int, ...], "text": str, "answer": str | null, "tests": str | null,
  "entry_point": str | null, "mode": "think" | "no_think" | null, "chat": bool, "where": str}``;
* ``PREFIX.tokenizer/`` -- the tokenizer the ids were made with (its chat template set);
* ``PREFIX.prompts.json`` -- the description (``format: megasmol-prompts/1``): counts, what was
  left out and why, prompt token length statistics. Written last: a prefix with a description is
  whole.

Every file is written under a ``.partial`` name and renamed when complete, the description last
(:func:`publish`). :func:`read_prompts` opens a set (random access by index; each line is parsed
when it is asked for).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError
from megasmol.data.masked.descriptions import DatasetKind
from megasmol.data.masked.layout import tokenizer_path

PROMPTS = DatasetKind("prompts", ".prompts.json", "megasmol-prompts/1", "prepare-prompts")
"""Not a masked-documents kind (the training loader never reads it): its own description."""


def records_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.prompts.jsonl")


def prompt_files(prefix: str | Path) -> list[Path]:
    """Every output of a prefix, the description last (it is renamed last)."""
    return [records_path(prefix), tokenizer_path(prefix), PROMPTS.path(prefix)]


@dataclass(frozen=True)
class PromptRecord:
    """One prompt and what its reward needs."""

    prompt_ids: list[int]
    """The prompt's token ids: what the policy generates after."""
    text: str
    """The prompt as rendered (the chat template's text up to and including the assistant's
    generation prompt, or the plain string)."""
    answer: Optional[str] = None
    """The reference answer (math): a GSM8K ``#### N`` answer is stored as ``N``."""
    tests: Optional[str] = None
    """Python tests that call ``entry_point`` and fail by raising (code)."""
    entry_point: Optional[str] = None
    """The function the tests call."""
    mode: Optional[str] = None
    """The reasoning mode the prompt asks for: ``think``, ``no_think`` (the rendered prompt
    says ``/think`` or ``/no_think``), or None."""
    chat: bool = False
    """Rendered with the chat template (False: a plain string, which the completion continues:
    for code, the solution is the prompt and the completion, as in HumanEval)."""
    where: str = ""
    """The input record it came from (file:line)."""

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class PromptSet:
    """A prepared prompt set: ``len``, indexing (``PromptRecord``), the description and the
    tokenizer directory."""

    def __init__(self, prefix: str | Path):
        self.prefix = Path(prefix)
        description = PROMPTS.read(prefix)
        path = records_path(prefix)
        if description is None or not path.is_file():
            raise ConfigError(f"{prefix}: not a prompt set (no {PROMPTS.path(prefix).name} and "
                              f"{path.name}); prepare one with `megasmol prepare-prompts`")
        self.description = description
        self._path = path
        offsets, position = [], 0
        with open(path, "rb") as handle:
            for line in handle:
                offsets.append(position)
                position += len(line)
        if len(offsets) != description.get("prompts"):
            raise ConfigError(f"{path}: {len(offsets)} line(s), its description says "
                              f"{description.get('prompts')}; prepare it again")
        self._offsets = offsets

    @property
    def tokenizer_dir(self) -> Path:
        return tokenizer_path(self.prefix)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> PromptRecord:
        if not -len(self) <= index < len(self):
            raise IndexError(f"prompt {index} of {len(self)}")
        with open(self._path, "rb") as handle:
            handle.seek(self._offsets[index])
            data = json.loads(handle.readline())
        return PromptRecord(**data)

    def __iter__(self):
        with open(self._path, "rb") as handle:
            for line in handle:
                yield PromptRecord(**json.loads(line))


def is_prompt_set(prefix: str | Path) -> bool:
    """Whether ``prefix`` is a whole prompt set (its description, of this format, and records)."""
    try:
        return PROMPTS.read(prefix) is not None and records_path(prefix).is_file()
    except ConfigError:
        return False


def read_prompts(prefix: str | Path) -> PromptSet:
    """The prompt set at ``prefix``; one error naming it when it is not one."""
    return PromptSet(prefix)


def publish(description: dict, partial: dict[Path, Path], prefix: Path) -> None:
    """Write the description and rename every ``.partial`` output into place, the description
    last."""
    final = PROMPTS.path(prefix)
    partial[final].write_text(json.dumps(description, indent=2) + "\n")
    final.unlink(missing_ok=True)
    for path, tmp in partial.items():
        if path == final:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    os.replace(partial[final], final)
