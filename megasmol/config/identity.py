"""Which config fields say what a run trains, and which only where it writes or when it stops:
the one list behind the resume note (``train/loop.py``) and the grouping of seeds (``ablate/``)."""

from __future__ import annotations

import json
from pathlib import Path

WHAT_THE_STEPS_DO = ("model", "data", "training", "optim", "schedule", "spikes", "preference")
"""Sections whose change alters what a resumed step computes."""

NOT_WHAT_IT_TRAINS = ("run_dir", "paths_from", "config_dir", "logging", "checkpoint.dir",
                      "checkpoint.staging_dir",
                      "checkpoint.post_save_command", "data.cache_dir", "training.stop_after_step",
                      "training.collective_timeout_s")
"""Fields (``section`` or ``section.field``) that say where a run writes or when it stops."""


def changed_fields(saved: dict, current: dict) -> list[str]:
    """``section.field: old -> new`` for each field of ``WHAT_THE_STEPS_DO`` that differs between
    two resolved configs (``RunConfig.to_dict``), leaving out ``NOT_WHAT_IT_TRAINS``."""
    changed = []
    for section in WHAT_THE_STEPS_DO:
        old, new = saved.get(section), current.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{section}.{k}: {old.get(k)!r} -> {new.get(k)!r}"
                        for k in sorted(set(old) | set(new))
                        if old.get(k) != new.get(k) and f"{section}.{k}" not in NOT_WHAT_IT_TRAINS]
        elif old != new and old is not None:
            changed.append(f"{section}: {old!r} -> {new!r}")
    return changed


def experiment_key(config: dict, also_ignore: tuple[str, ...] = ("training.seed",)) -> str:
    """The resolved config without ``NOT_WHAT_IT_TRAINS`` (and, by default, the seed): runs with
    the same key are one experiment."""
    tree = json.loads(json.dumps(config))
    tree["model"] = model_identity(tree.get("model"))
    for dotted in NOT_WHAT_IT_TRAINS + also_ignore:
        node, *rest = dotted.split(".")
        if not rest:
            tree.pop(node, None)
        elif isinstance(tree.get(node), dict):
            tree[node].pop(rest[0], None)
    return json.dumps(tree, sort_keys=True)


def model_identity(model):
    """A model given as a spec file is the spec it holds, not where the file is: the seeds of a
    ``--vary model.FIELD`` ablation each have their own copy of the same spec."""
    if isinstance(model, str) and model.endswith((".yaml", ".yml")) and Path(model).is_file():
        import yaml

        return yaml.safe_load(Path(model).read_text())
    return model
