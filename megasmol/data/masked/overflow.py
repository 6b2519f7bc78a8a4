"""``--on-overflow``: what ``prepare-chat`` / ``prepare-preferences`` do with a document over
``--max-length``."""

from __future__ import annotations

from megasmol.config.typed import ConfigError

OVERFLOW_POLICIES = ("error", "truncate", "drop")


def check_overflow(on_overflow: str) -> None:
    if on_overflow not in OVERFLOW_POLICIES:
        raise ConfigError(f"--on-overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {on_overflow!r}")


def overflow_reason(on_overflow: str) -> str:
    """The reason a document left out for its length is counted under (``error`` or ``drop``)."""
    return "too_long" if on_overflow == "error" else "dropped_too_long"
