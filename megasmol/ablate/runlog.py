"""What ``compare`` knows about a run: its ``metrics.jsonl`` (train, validation and downstream
records) and its resolved config (``run_config.json``), read from the run directory only."""

from __future__ import annotations

import bisect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError

# Config fields that say where a run writes, not what it trains: runs that differ only in these
# (and the seed) are seeds of one experiment.
NOT_THE_EXPERIMENT = ("run_dir", "paths_from", "config_dir", "logging", "checkpoint.dir",
                      "checkpoint.post_save_command", "data.cache_dir", "training.seed",
                      "training.stop_after_step", "training.collective_timeout_s")
SEED_SUFFIX = re.compile(r"^(.*?)[_-]?seed[=_-]?\d+$")


@dataclass
class RunLog:
    path: Path
    name: str
    config: Optional[dict]
    train: list[dict] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    downstream: list[dict] = field(default_factory=list)

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
        if self.config is None:
            return None
        tree = json.loads(json.dumps(self.config))
        for dotted in NOT_THE_EXPERIMENT:
            node, *rest = dotted.split(".")
            if not rest:
                tree.pop(node, None)
            elif isinstance(tree.get(node), dict):
                tree[node].pop(rest[0], None)
        return json.dumps(tree, sort_keys=True)


def _last_per_step(records: list[dict]) -> list[dict]:
    """A step logged twice (a resume or a rollback re-ran it) keeps its last record."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]


def read_run(path: str | Path) -> RunLog:
    path = Path(path)
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{path}: not a run directory (no metrics.jsonl)")
    kinds: dict[str, list[dict]] = {"train": [], "validation": [], "downstream": []}
    lines = metrics.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a torn last line: the run was killed mid-write
                break
            raise ConfigError(f"{metrics}:{number}: not JSON ({exc})") from None
        if record.get("kind") in kinds and isinstance(record.get("step"), int):
            kinds[record["kind"]].append(record)
    config = None
    config_file = path / "run_config.json"
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_file}: not JSON ({exc})") from None
    return RunLog(path=path, name=path.name, config=config,
                  train=_last_per_step(kinds["train"]),
                  validation=_last_per_step(kinds["validation"]),
                  downstream=_last_per_step(kinds["downstream"]))


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
