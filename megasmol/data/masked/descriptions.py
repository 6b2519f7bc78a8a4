"""Dataset descriptions: the JSON written beside a prefix that says what it holds.

Each kind of masked-documents data is one row of :data:`KINDS` (its file suffix, format tag, and
the command that prepares it); a prefix with none of these files is plain token data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError


@dataclass(frozen=True)
class DatasetKind:
    name: str
    """How messages name the data: "chat", "preference"."""
    suffix: str
    """The description file after the prefix, e.g. ``.chat.json``."""
    format: str
    """The ``format`` the description must carry, e.g. ``megasmol-chat/1``."""
    command: str
    """The command that prepares it (named when the files need preparing again)."""

    def path(self, prefix: str | Path) -> Path:
        return Path(f"{prefix}{self.suffix}")

    def read(self, prefix: str | Path) -> Optional[dict]:
        """The description of ``prefix``, or None when ``prefix`` is not data of this kind."""
        return read_json_description(self.path(prefix), self.format, self.name)


CHAT = DatasetKind("chat", ".chat.json", "megasmol-chat/1", "prepare-chat")
PREFERENCE = DatasetKind("preference", ".pref.json", "megasmol-pref/1", "prepare-preferences")
KINDS = (CHAT, PREFERENCE)


def read_json_description(path: Path, fmt: str, kind: str) -> Optional[dict]:
    """A dataset description written beside its prefix (None when absent); one error naming the
    file when it is unreadable or of another format."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable {kind} dataset description ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ConfigError(f"{path}: not a {fmt} description")
    return data


def describe(prefix: str | Path) -> Optional[tuple[DatasetKind, dict]]:
    """(kind, description) of a masked-documents prefix; None for plain token data."""
    for kind in KINDS:
        description = kind.read(prefix)
        if description is not None:
            return kind, description
    return None
