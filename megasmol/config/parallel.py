"""Parallel layout: sizes, their validation against the world and the model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from megasmol.config.typed import ConfigError


def job_world_size(env=os.environ) -> int:
    """The processes the launcher started (torchrun's ``WORLD_SIZE``, srun's ``SLURM_NTASKS``;
    1 without one), read as ``runtime/distributed.py`` reads them, without torch."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_NTASKS"])
    return 1


@dataclass
class ParallelLayout:
    """How the job's ranks are split; data parallel takes what is left."""

    tensor_parallel: int = 1
    """Tensor-parallel size (splits heads, KV groups, FFN and vocabulary)."""
    pipeline_parallel: int = 1
    """Pipeline-parallel size (splits layers into stages)."""
    context_parallel: int = 1
    """Context-parallel size (splits the sequence; te ring attention or sdpa all-gather KV)."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence inside TP regions (TP > 1, te backend)."""

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def model_parallel(self) -> int:
        return self.tensor_parallel * self.pipeline_parallel * self.context_parallel

    def data_parallel(self, world_size: int) -> int:
        return world_size // self.model_parallel

    def _launch_hint(self, world_size: int) -> str:
        """How to start enough processes, when ``world_size`` is this job's own (not a world
        size being planned, as pre-flight's ``--world-size``)."""
        if world_size != job_world_size():
            return ""
        needed = -(-world_size // self.model_parallel) * self.model_parallel
        return (f": the layout needs a multiple of {self.model_parallel} processes; start "
                f"{needed} with `torchrun --nproc_per_node {needed} -m megasmol ...` (the same "
                "command and arguments)")

    def check(self, world_size: int, spec=None, seq_length: int | None = None) -> None:
        """Raise ConfigError naming the field when this layout cannot run."""
        self.validate()
        if world_size % self.model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor_parallel x "
                f"pipeline_parallel x context_parallel = {self.tensor_parallel} x "
                f"{self.pipeline_parallel} x {self.context_parallel}" + self._launch_hint(world_size)
            )
        if spec is not None:
            tp = self.tensor_parallel
            # Tensor parallelism splits heads, KV groups, the FFN and the vocabulary.
            for field in ("num_attention_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
                if getattr(spec, field) % tp:
                    raise ConfigError(
                        f"parallel.tensor_parallel={tp} does not divide {field}="
                        f"{getattr(spec, field)}"
                    )
            if spec.num_layers % self.pipeline_parallel:
                raise ConfigError(
                    f"parallel.pipeline_parallel={self.pipeline_parallel} does not divide "
                    f"num_layers={spec.num_layers}"
                )
        if seq_length is not None and self.context_parallel > 1:
            if seq_length % (2 * self.context_parallel):
                raise ConfigError(
                    f"sequence length {seq_length} is not divisible by 2 x context_parallel="
                    f"{2 * self.context_parallel}"
                )
