"""Whether a model or dataset hub can be asked at all, decided at once: offline machines (and
``HF_HUB_OFFLINE=1``) get one line naming what was asked for, instead of a minute of retries and
a traceback from deep inside huggingface_hub."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from typing import Optional
from urllib.parse import urlparse

OFFLINE_VALUES = ("1", "true", "yes", "on")


def unreachable(url: str, timeout_s: float) -> Optional[str]:
    """None when a TCP connection to ``url``'s host and port opens within ``timeout_s`` (or the
    URL names no host); otherwise ``cannot reach HOST:PORT (why)``."""
    parsed = urlparse(url)
    if not parsed.hostname:
        return None
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return f"cannot reach {parsed.hostname}:{port} ({exc.__class__.__name__}: {exc})"


@lru_cache(maxsize=1)
def hub_unavailable(timeout_s: float = 3.0) -> Optional[str]:
    """None when the hub answers; otherwise why not, in a few words."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in OFFLINE_VALUES:
            return f"{name} is set"
    return unreachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout_s)


def require_hub(what: str, local_hint: str) -> None:
    """Raise a one-line ConfigError when ``what`` would need the hub and it cannot be reached."""
    from megasmol.config.typed import ConfigError

    why = hub_unavailable()
    if why is not None:
        raise ConfigError(f"{what} needs the hub, and {why}: {local_hint}")
