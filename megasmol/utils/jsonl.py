"""Reading JSON Lines with errors that name the file and the line."""

from __future__ import annotations

import json
from collections.abc import Iterator

from megasmol.config.typed import ConfigError


def json_lines(lines: list[str], source, *, torn_tail_ok: bool = False) -> Iterator[tuple[int, object]]:
    """``(line number, value)`` for each non-blank line. A line that is not JSON is a ConfigError
    naming ``source`` and the line, except, with ``torn_tail_ok``, the last one (a writer killed
    mid-line), which is left out."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            if torn_tail_ok and number == len(lines):
                return
            raise ConfigError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
