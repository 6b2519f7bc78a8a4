"""One console style for log records: megasmol's own lines as plain lines (a warning or an error
says so: ``warning: ...``), paths relative to the current directory when beneath it, no logger
names or level prefixes. Another library's warning keeps its logger's name, so its source shows."""

from __future__ import annotations

import logging

from megasmol.utils.fs import shown_paths


class ConsoleFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = shown_paths(super().format(record))
        if record.levelno < logging.WARNING:
            return text
        source = "" if record.name.split(".")[0] == "megasmol" else f"{record.name}: "
        return f"{record.levelname.lower()}: {source}{text}"


def configure_console_logging(level: int = logging.INFO) -> None:
    """The root logger prints through :class:`ConsoleFormatter` on stderr (as
    ``logging.basicConfig``: nothing changes when the root logger already has a handler)."""
    handler = logging.StreamHandler()
    handler.setFormatter(ConsoleFormatter())
    logging.basicConfig(level=level, handlers=[handler])
