"""A run directory's files and its metric record kinds: the one list writers and readers share.

``RUN_DIR/`` holds ``metrics.jsonl`` (one JSON record per line, each with a ``kind``),
``run_config.json`` (the resolved config, what ``compare`` and ``ablate`` group runs by),
``result.json`` (how the run ended), ``downstream/iter_STEP/`` (in-loop evaluation outputs),
``hang.json`` (the watchdog's marker, which the launch scripts requeue on) and ``checkpoints/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError


class Kind:
    """The ``kind`` of a ``metrics.jsonl`` record."""

    TRAIN = "train"
    """One logging interval: loss, grad norm, tokens/s, MFU, consumed tokens, ..."""
    VALIDATION = "validation"
    DOWNSTREAM = "downstream"
    """In-loop task scores: ``TASK/METRIC``, ``TASK/METRIC_stderr``, ``SUITE/average``."""
    SPIKE = "spike"
    SKIPPED_UPDATE = "skipped_update"
    """A step whose loss or gradient was not finite: no update."""
    DIVERGED = "diverged"
    """The run stopped as diverged (too many non-finite steps, or spike rollbacks): ``reason``."""
    THROUGHPUT_WARNING = "throughput_warning"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def run_config(self) -> Path:
        return self.path / "run_config.json"

    @property
    def result(self) -> Path:
        return self.path / "result.json"

    @property
    def hang_marker(self) -> Path:
        """Left by the hang watchdog; the launch scripts requeue a job that left one."""
        return self.path / "hang.json"

    def downstream(self, step: int) -> Path:
        return self.path / "downstream" / f"iter_{step:07d}"

    def records(self, kind: Optional[str] = None) -> list[dict]:
        """``metrics.jsonl``'s records (of ``kind``), in order. A torn last line (the run was
        killed mid-write) is left out; any other line that is not JSON is a ConfigError."""
        if not self.metrics.is_file():
            raise ConfigError(f"{self.path}: not a run directory (no metrics.jsonl)")
        from megasmol.utils.jsonl import json_lines

        lines = self.metrics.read_text().splitlines()
        return [record for _, record in json_lines(lines, self.metrics, torn_tail_ok=True)
                if kind is None or record.get("kind") == kind]
