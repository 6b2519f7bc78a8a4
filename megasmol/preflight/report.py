"""Check results, the console table, the JSON report and the exit code."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from megasmol.utils.fs import shown_paths

Status = Literal["pass", "warn", "fail", "skip"]
ORDER = {"fail": 0, "warn": 1, "pass": 2, "skip": 3}


@dataclass
class CheckResult:
    check: str
    """Which check (gemm, memory_bandwidth, nvml, dcgm, collectives, storage, dry_run)."""
    status: Status
    summary: str
    """One line a person reads in the table."""
    target: str = "node"
    """What it is about: a device (``rank 3 / cuda:3``), ``job``, a path..."""
    details: dict = field(default_factory=dict)
    """Numbers behind the summary, for the JSON report."""


@dataclass
class PreflightReport:
    results: list[CheckResult] = field(default_factory=list)
    host: str = ""
    level: str = "quick"

    def add(self, result: CheckResult) -> CheckResult:
        self.results.append(result)
        return result

    def extend(self, results) -> None:
        self.results.extend(results)

    @property
    def failed(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def warned(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "warn"]

    def exit_code(self, strict: bool = False) -> int:
        """1 when a check failed (or, with ``strict``, warned); 0 otherwise."""
        return 1 if self.failed or (strict and self.warned) else 0

    def verdict(self, strict: bool = False) -> str:
        if self.exit_code(strict):
            bad = self.failed + (self.warned if strict else [])
            return "NO-GO: " + "; ".join(f"{r.check} {shown_paths(r.target)}: {shown_paths(r.summary)}"
                                         for r in bad)
        extra = f" ({len(self.warned)} warning(s))" if self.warned else ""
        return f"GO{extra}"

    def render(self, strict: bool = False) -> str:
        rows = [("check", "target", "status", "summary")]  # paths as typed, relative (shown_paths)
        rows += [(r.check, shown_paths(r.target), r.status.upper(), shown_paths(r.summary))
                 for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        lines = []
        for index, row in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(row[:3], widths)) + "  " + row[3])
            if index == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 40)
        lines.append(f"preflight ({self.level}) on {self.host}: {self.verdict(strict)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"host": self.host, "level": self.level, "go": not self.failed,
                "results": [asdict(r) for r in self.results]}

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        return path


def worst(statuses: list[Status]) -> Status:
    return min(statuses, key=ORDER.__getitem__) if statuses else "skip"


def skipped(check: str, why: str, target: str = "node") -> CheckResult:
    return CheckResult(check, "skip", f"skipped: {why}", target)


def slow_outliers(values: dict, tolerance: float) -> list:
    """Keys whose time is more than ``tolerance`` above the (lower) median AND more than one
    standard deviation above the mean: Megatron-LM's straggler rule, kept meaningful for two
    ranks (where every value sits exactly one deviation from the mean)."""
    if len(values) < 2:
        return []
    numbers = sorted(values.values())
    mean = sum(numbers) / len(numbers)
    std = (sum((x - mean) ** 2 for x in numbers) / len(numbers)) ** 0.5
    median = numbers[(len(numbers) - 1) // 2]
    return [k for k, v in values.items() if v > median * (1 + tolerance) and v >= mean + std - 1e-12]


def below_best(values: dict, tolerance: float) -> list:
    """Keys whose value is more than ``tolerance`` below the best one (GPU Fryer's rule)."""
    if not values:
        return []
    best = max(values.values())
    return [k for k, v in values.items() if v < best * (1 - tolerance)]

