"""What ``compare`` knows about a run: its ``metrics.jsonl`` (train, validation and downstream
records, and whether it diverged) and its resolved config (``run_config.json``), read from the
run directory only."""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.config.identity import experiment_key
from megasmol.config.typed import ConfigError

SEED_SUFFIX = re.compile(r"^(.*?)[_-]?seed[=_-]?\d+$")


@dataclass
class RunLog:
    path: Path
    name: str
    config: Optional[dict]
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    downstream: list[dict] = field(default_factory=list)
    diverged: Optional[str] = None
    """Why the run counts as diverged (None: it did not): its own ``diverged`` marker (stopped
    after too many non-finite steps or spike rollbacks), or a non-finite training loss."""

    @property
    def seed(self) -> Optional[int]:
        return (self.config or {}).get("training", {}).get("seed")

    def tokens_at(self, step: int) -> float:
        """Training tokens through ``step`` (from the train records' ``consumed_tokens``)."""
        steps = [r["step"] for r in self.train if "consumed_tokens" in r]
        if not steps:
            return float("nan")
        tokens = [r["consumed_tokens"] for r in self.train if "consumed_tokens" in r]
        i = bisect.bisect_left(steps, step)
        if i < len(steps) and steps[i] == step:
            return float(tokens[i])
        if i == 0:
            return tokens[0] * step / steps[0]
        if i == len(steps):
            return tokens[-1] * step / steps[-1]
        s0, s1, t0, t1 = steps[i - 1], steps[i], tokens[i - 1], tokens[i]
        return t0 + (t1 - t0) * (step - s0) / (s1 - s0)

    def metric_names(self) -> list[str]:
        """Downstream ``task/metric`` keys (not their standard errors or chance levels)."""
        names = set()
        for record in self.downstream:
            names.update(k for k in record if "/" in k and not k.endswith(("_stderr", "/chance")))
        return sorted(names)

    def chance(self, metric: str) -> Optional[float]:
        task = metric.split("/")[0]
        for record in reversed(self.downstream):
            if f"{task}/chance" in record:
                return record[f"{task}/chance"]
        return None

    def experiment_key(self) -> Optional[str]:
        """The config without where-it-writes fields and the seed (None without a config)."""
        return None if self.config is None else experiment_key(self.config)


def _last_per_step(records: list[dict]) -> list[dict]:
    """A step logged twice (a resume or a rollback re-ran it) keeps its last record."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def _divergence(records: list[dict]) -> Optional[str]:
    """The first sign in ``records`` that the run diverged (see ``RunLog.diverged``)."""
    from megasmol.runtime.run_dir import Kind

    for record in records:
        if record.get("kind") == Kind.DIVERGED:
            return f"stopped at step {record.get('step')}: {record.get('reason', 'diverged')}"
    for record in records:
        loss = record.get("loss")
        # The metrics log writes a non-finite value as null and names it in ``nonfinite_keys``.
        nonfinite = ("loss" in (record.get("nonfinite_keys") or ())
                     or (isinstance(loss, float) and not math.isfinite(loss)))
        if record.get("kind") in (Kind.TRAIN, Kind.SKIPPED_UPDATE) and nonfinite:
            return f"non-finite loss at step {record.get('step')}"
    return None


def read_run(path: str | Path) -> RunLog:
    from megasmol.runtime.run_dir import Kind, RunDir

    path = Path(path)
    run = RunDir(path)
    kinds: dict[str, list[dict]] = {Kind.TRAIN: [], Kind.VALIDATION: [], Kind.DOWNSTREAM: []}
    records = run.records()
    for record in records:
        if record.get("kind") in kinds and isinstance(record.get("step"), int):
            kinds[record["kind"]].append(record)
    config = None
    config_file = run.run_config
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file}: not JSON ({exc})") from None
    return RunLog(path=path, name=path.name, config=config,
                  train=_last_per_step(kinds[Kind.TRAIN]),
                  validation=_last_per_step(kinds[Kind.VALIDATION]),
                  downstream=_last_per_step(kinds[Kind.DOWNSTREAM]),
                  diverged=_divergence(records))


def group_by_seed(runs: list[RunLog]) -> dict[str, list[RunLog]]:
    """Runs whose configs differ only by seed (and where they write) form one group, named after
    the common name without its seed suffix."""
    keyed: dict[str, list[RunLog]] = {}
    for run in runs:
        key = run.experiment_key() or f"run:{run.path}"
        keyed.setdefault(key, []).append(run)
    groups: dict[str, list[RunLog]] = {}
    for members in keyed.values():
        stems = {(SEED_SUFFIX.match(m.name) or re.match(r"(.*)", m.name)).group(1) for m in members}
        name = stems.pop() if len(stems) == 1 and len(members) > 1 else members[0].name
        while name in groups:
            name += "'"
        groups[name] = members
    return groups
