"""A grid of ablation runs from one base config: one run config per combination of the varied
values (and seed), a manifest, and a way to run them (here one after another, or a Slurm array).

``--vary model.FIELD=...`` changes the model spec (a ``model.yaml`` is written next to the run
config); any other ``section.field`` is a run-config field, checked by loading the written config.
With ``match_params``, a variant whose spec changes the parameter count gets the number of layers
that brings it closest to the base model's count, as the playbook does for architecture
ablations (e.g. fewer KV heads, more layers).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megasmol.config.typed import ConfigError, load_yaml
from megasmol.model.run_spec import model_reference
from megasmol.utils.fs import atomic_write_text

MANIFEST = "manifest.json"
CONFIG_LIST = "configs.txt"


@dataclass
class Variation:
    key: str
    """Dotted field: ``model.FIELD`` (model spec) or ``section.field`` (run config)."""
    values: list[Any]


def parse_vary(text: str) -> Variation:
    """``key=v1,v2,...``; each value is read as YAML (numbers, booleans, strings)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or not raw.strip():
        raise ConfigError(f"--vary {text!r}: expected section.field=value1,value2,...")
    if key in ("run_dir", "paths_from", "training.seed"):
        raise ConfigError(f"--vary {key}: set by ablate itself (use --seeds for seeds)")
    values = []
    for item in raw.split(","):
        try:
            values.append(yaml.safe_load(item.strip()))
        except yaml.YAMLError as exc:
            raise ConfigError(f"--vary {key}: cannot read value {item!r}: {exc}") from None
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"--vary {key}: a value is repeated")
    return Variation(key, values)


@dataclass
class GridRun:
    name: str
    group: str
    """The name without the seed: runs of one group differ only by seed."""
    seed: int
    changes: dict[str, Any]
    config: Path
    run_dir: Path
    params: Optional[int] = None
    """Parameters of the model this run trains."""
    num_layers: Optional[int] = None
    unmatched_params: Optional[int] = None
    """With --match-params: the parameters before the depth was matched."""
    matched_layers: Optional[int] = None

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "config": str(self.config), "run_dir": str(self.run_dir)}


@dataclass
class Grid:
    out: Path
    base_config: Path
    runs: list[GridRun] = field(default_factory=list)
    base_params: Optional[int] = None
    base_layers: Optional[int] = None

    def write_manifest(self, varies: list[Variation], seeds: int) -> Path:
        manifest = {"base_config": str(self.base_config), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "vary": {v.key: v.values for v in varies}, "seeds": seeds,
                    "base_params": self.base_params, "base_layers": self.base_layers,
                    "runs": [r.to_json() for r in self.runs]}
        path = self.out / MANIFEST
        atomic_write_text(path, json.dumps(manifest, indent=2))
        atomic_write_text(self.out / CONFIG_LIST, "".join(f"{r.config}\n" for r in self.runs))
        return path


def _short_names(keys: list[str]) -> dict[str, str]:
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", str(text)).strip("-") or "x"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--vary {dotted}: {key} is not a section")
        node = child
    node[keys[-1]] = value


def _spec_fields() -> set[str]:
    from megasmol.model.spec import ModelSpec

    return {f.name for f in dataclasses.fields(ModelSpec)}


def closest_depth(spec, target: int) -> tuple[int, int]:
    """The number of layers whose parameter count is closest to ``target``, and that count."""
    from megasmol.model.flops import parameter_count

    best = None
    for layers in range(1, 4 * spec.num_layers + 1):
        try:
            candidate = spec.replace(num_layers=layers)
        except ConfigError:
            continue  # e.g. an explicit nope_layers list that a shallower model cannot have
        count = parameter_count(candidate).total
        if best is None or abs(count - target) < abs(best[1] - target):
            best = (layers, count)
    if best is None:
        raise ConfigError(f"--match-params: no layer count gives a valid {spec.name} spec")
    return best


def plan_grid(base_config: str | Path, varies: list[Variation], out: str | Path, *, seeds: int = 1,
              match_params: bool = False, sets: Optional[list[str]] = None) -> Grid:
    """Write one run config (and model.yaml when the spec changes) per combination under ``out``;
    ``sets`` (``section.field=value``) change the base for every run."""
    from megasmol.config.run import load_run_config
    from megasmol.model.flops import parameter_count
    from megasmol.model.spec import load_model_spec

    base_config = Path(base_config).resolve()
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: is a file; the grid's run configs go to a directory")
    fixed = {}
    for item in sets or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item}: expected section.field=value")
        fixed[key.strip()] = yaml.safe_load(raw)
    if any(k.startswith("model.") for k in fixed):
        raise ConfigError("--set model.FIELD: vary the model spec with --vary (one value is fine)")
    base = load_run_config(base_config, sets)
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    keys = [v.key for v in varies]
    if len(set(keys)) != len(keys):
        raise ConfigError("--vary: a key is given twice")
    spec_keys = [k for k in keys if k.startswith("model.")]
    unknown = [k for k in spec_keys if k.split(".", 1)[1] not in _spec_fields()]
    if unknown:
        raise ConfigError(f"--vary {unknown[0]}: not a model spec field (see `megasmol info`)")
    base_spec = load_model_spec(model_reference(base))
    out = Path(out).resolve()
    grid = Grid(out=out, base_config=base_config, base_params=parameter_count(base_spec).total,
                base_layers=base_spec.num_layers)
    short = _short_names(keys)
    raw_base = load_yaml(base_config)
    for key, value in fixed.items():
        _set_dotted(raw_base, key, value)
    combos = list(itertools.product(*[v.values for v in varies])) if varies else [()]
    for combo in combos:
        changes = dict(zip(keys, combo))
        group = "_".join(f"{short[k]}={_value_text(v)}" for k, v in changes.items()) or "base"
        spec_changes = {k.split(".", 1)[1]: v for k, v in changes.items() if k in spec_keys}
        try:
            spec = base_spec.replace(**spec_changes) if spec_changes else base_spec
        except ConfigError as exc:
            raise ConfigError(f"variant {group}: {exc}") from None
        matched = None
        unmatched = parameter_count(spec).total
        if match_params and spec_changes and "num_layers" not in spec_changes:
            matched, _ = closest_depth(spec, grid.base_params)
            if matched != spec.num_layers:
                spec = spec.replace(num_layers=matched)
        for index in range(seeds):
            seed = base.training.seed + index
            name = group if seeds == 1 else f"{group}_seed={seed}"
            run_dir = out / name
            tree = json.loads(json.dumps(raw_base))  # a deep copy of plain data
            for key, value in changes.items():
                if key not in spec_keys:
                    _set_dotted(tree, key, value)
            tree["paths_from"] = str(base.path(raw_base.get("paths_from") or "."))
            tree["run_dir"] = str(run_dir)
            _set_dotted(tree, "training.seed", seed)
            if base.checkpoint.dir:  # never share one checkpoint directory between runs
                _set_dotted(tree, "checkpoint.dir", str(run_dir / "checkpoints"))
            run_dir.mkdir(parents=True, exist_ok=True)
            if spec_changes:
                spec_path = run_dir / "model.yaml"
                atomic_write_text(spec_path, yaml.safe_dump(
                    {**spec.to_dict(), "name": f"{base_spec.name}-{group}",
                     "source": f"{base_spec.source}; ablation {group}"}, sort_keys=False))
                tree["model"] = str(spec_path)
            config_path = run_dir / "config.yaml"
            atomic_write_text(config_path, yaml.safe_dump(tree, sort_keys=False))
            try:
                load_run_config(config_path)
            except ConfigError as exc:
                raise ConfigError(f"variant {name}: {exc}") from None
            grid.runs.append(GridRun(name=name, group=group, seed=seed, changes=changes,
                                     config=config_path, run_dir=run_dir,
                                     params=parameter_count(spec).total, num_layers=spec.num_layers,
                                     unmatched_params=unmatched, matched_layers=matched))
    grid.write_manifest(varies, seeds)
    return grid


def is_finished(run: GridRun) -> bool:
    """The run reached its last step (``result.json`` says so, with no stop signal)."""
    from megasmol.config.run import load_run_config
    from megasmol.runtime.run_dir import RunDir

    result = RunDir(run.run_dir).result
    if not result.is_file():
        return False
    try:
        info = json.loads(result.read_text())
    except json.JSONDecodeError:
        return False
    training = load_run_config(run.config).training
    return info.get("stopped_by") is None and info.get("last_step") == (
        training.stop_after_step or training.train_steps)


def params_table(grid: Grid) -> tuple[list[str], list[list[str]]]:
    """One row per variant: its parameters as varied, and the depth that matches the base."""
    def delta(count: int) -> str:
        return f"{100.0 * (count - grid.base_params) / grid.base_params:+.2f}%"

    header = ["variant", "layers", "params", "vs base", "matched layers", "matched params", "vs base"]
    rows, seen = [[f"base ({Path(grid.base_config).name})", str(grid.base_layers),
                   f"{grid.base_params:,}", "", "", "", ""]], set()
    for run in grid.runs:
        if run.group in seen:
            continue  # one row per variant, not per seed
        seen.add(run.group)
        layers = run.num_layers if run.matched_layers is None else grid.base_layers
        row = [run.group, str(layers), f"{run.unmatched_params:,}",
               delta(run.unmatched_params)]
        if run.matched_layers is None:
            row += ["-", "-", "-"]
        else:
            row += [str(run.matched_layers), f"{run.params:,}", delta(run.params)]
        rows.append(row)
    return header, rows
