"""Progress bars for long commands (tqdm on a terminal, silent when disabled)."""

from __future__ import annotations

import contextlib
import sys

from tqdm.auto import tqdm


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True, unit: str = "it"):
    bar = tqdm(total=total, desc=description, unit=unit, disable=not enabled,
               file=sys.stderr, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
