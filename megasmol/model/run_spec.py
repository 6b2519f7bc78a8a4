"""The model a run config trains: its ``model`` reference resolved (a preset, a spec YAML, a
checkpoint directory, or the run's start checkpoint) and the run's ``rope`` and
``training.attention_backend`` applied. The config only names them; this resolves them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megasmol.config.typed import ConfigError
from megasmol.model.spec import ModelSpec, load_model_spec

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig


def model_reference(config: RunConfig) -> str:
    """The model spec: a YAML file or checkpoint directory (relative to the config) when one
    exists, else a preset; without ``model``, the ``init_from`` or ``branch_from`` checkpoint."""
    if config.model is None and config.checkpoint.branch_from is not None:
        from megasmol.ckpt.branch import locate_source

        return str(locate_source(config))
    if config.model is None:
        assert config.checkpoint.init_from is not None  # RunConfig.validate: one of the three
        source = config.path(config.checkpoint.init_from)
        if not source.exists():  # else load_model_spec would take it for an unknown preset
            raise ConfigError(f"checkpoint.init_from: no such checkpoint: {source}")
        return str(source)
    candidate = config.path(config.model)
    return str(candidate) if candidate.exists() else config.model


def run_model_spec(config: RunConfig) -> ModelSpec:
    """The spec this run trains: the referenced one with ``rope`` and
    ``training.attention_backend`` applied."""
    spec = load_model_spec(model_reference(config))
    changes: dict[str, object] = {}
    if config.training.attention_backend is not None:
        changes["attention_backend"] = config.training.attention_backend
    if config.rope.theta is not None:
        changes["rope_theta"] = config.rope.theta
    if config.rope.max_position_embeddings is not None:
        changes["max_position_embeddings"] = config.rope.max_position_embeddings
    return spec.replace(**changes) if changes else spec
