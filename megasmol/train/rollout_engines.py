"""The rollout engines ``rl.engine`` chooses from: each is an entry of :data:`ROLLOUT_ENGINES`
with what it needs (``check``, before anything runs) and how it is bound to a run's model
(``bind``, at set-up): a ``generate(prompts, seeds) -> list[Completion]`` over the trainer's own
model, with the run's sampling settings (``rl.temperature``, ``top_p``, ``top_k``), stopping at
the stop ids or ``rl.max_completion_length``. This module imports nothing heavy: the config reads
the names from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megasmol.config.typed import ConfigError

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig
    from megasmol.train.setup import TrainingSetup

Generate = Callable[[list[list[int]], list[int]], list]
"""``(prompt ids, one seed per prompt) -> completions`` (:class:`megasmol.decode.completion.Completion`)."""


@dataclass(frozen=True)
class RolloutEngine:
    """One way of sampling the rollouts."""

    name: str
    summary: str
    """One line for the docs and errors."""
    reports_entropy: bool
    """Whether its completions carry per-token entropies (the ``entropy`` metric)."""
    check: Callable[[RunConfig], None]
    """Raises ``ConfigError`` naming the field when the run cannot use it (before anything runs)."""
    bind: Callable[[TrainingSetup, set[int]], Generate]
    """``(setup, stop ids) -> generate`` over the run's model."""


def _check_megasmol(config: RunConfig) -> None:
    return None


def _bind_megasmol(setup: TrainingSetup, stops: set[int]) -> Generate:
    def generate(prompts: list[list[int]], seeds: list[int]) -> list:
        return sample_completions(setup, prompts, seeds, stops)

    return generate


def sample_completions(setup: TrainingSetup, prompts: list[list[int]], seeds: list[int],
                       stops: set[int]) -> list:
    """Completions of ``prompts`` sampled by the run's model in its training layout: with the KV
    cache when one process holds the whole model (any data parallelism), else through the
    pipeline schedule, recomputing the prefix (tensor, pipeline or context parallelism)."""
    from megatron.core import parallel_state

    from megasmol.decode.cached import generate
    from megasmol.decode.sampling import SamplingParams

    rl = setup.config.rl
    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k)
    def stop(row: int, ids: list[int]) -> bool:
        return ids[-1] in stops

    whole = (parallel_state.get_tensor_model_parallel_world_size() == 1
             and parallel_state.get_pipeline_model_parallel_world_size() == 1
             and parallel_state.get_context_parallel_world_size() == 1)
    if whole:  # eval mode while decoding (Megatron-Core's KV-cache path asks for it)
        training = setup.model.training
        setup.model.eval()
        try:
            return generate(setup.model, prompts, rl.max_completion_length, sampling=sampling,
                            seeds=seeds, eos_token_id=setup.spec.eos_token_id, stop=stop)
        finally:
            setup.model.train(training)
    from megasmol.decode.parallel import generate_parallel

    return generate_parallel(setup.model, setup.ddp_model, prompts, rl.max_completion_length,
                             micro_batch_size=setup.config.training.micro_batch_size,
                             sampling=sampling, seeds=seeds, eos_token_id=setup.spec.eos_token_id,
                             stop=stop)


def needs_cuda(what: str, advice: str = "use rl.engine: megasmol") -> None:
    """One line when this machine has no CUDA device (``what``: the field or command asking)."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs CUDA (Megatron-Core's DynamicInferenceEngine runs on GPUs "
                          f"only) and this machine has none: {advice}")


def dynamic_engine_limits(config: RunConfig, name: str = "rl.engine megatron-dynamic") -> None:
    """What Megatron-Core 0.16.1's engine cannot take, whatever the layout."""
    import importlib.util

    rl = config.rl
    if config.training.precision == "fp32":
        raise ConfigError(f"{name} needs training.precision bf16 (its flash-attn kernels take "
                          "16-bit inputs), not fp32")
    if rl.top_k > 0 and rl.top_p < 1:
        raise ConfigError(f"{name} takes rl.top_k or rl.top_p, not both (Megatron-Core refuses the "
                          "pair): set rl.top_k 0 or rl.top_p 1")
    if importlib.util.find_spec("flash_attn") is None and importlib.util.find_spec("flash_attn_3") is None:
        raise ConfigError(f"{name} needs flash-attn >= 2.7.3 (Megatron-Core's dynamic batching "
                          "attention kernel): pip install flash-attn")


def _check_megatron_dynamic(config: RunConfig) -> None:
    name = "rl.engine megatron-dynamic"
    needs_cuda(name)
    layout = config.parallel
    for field in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
        if getattr(layout, field) > 1:
            raise ConfigError(f"{name} runs with the whole model in each process (data "
                              f"parallelism only), not parallel.{field} {getattr(layout, field)}: "
                              "use rl.engine: megasmol")
    dynamic_engine_limits(config, name)


def _bind_megatron_dynamic(setup: TrainingSetup, stops: set[int]) -> Generate:
    from megasmol.decode.megatron_dynamic import generate_dynamic
    from megasmol.decode.sampling import SamplingParams

    rl = setup.config.rl
    sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k)

    def generate(prompts: list[list[int]], seeds: list[int]) -> list:
        return generate_dynamic(setup.model, prompts, rl.max_completion_length, sampling=sampling,
                                seeds=seeds, eos_token_id=setup.spec.eos_token_id, stop_ids=sorted(stops))

    return generate


ROLLOUT_ENGINES: dict[str, RolloutEngine] = {
    engine.name: engine for engine in (
        RolloutEngine("megasmol", "megasmol's own decoder (megasmol.decode): any device and layout, "
                      "one seeded generator per completion, exactly on-policy (tested)",
                      reports_entropy=True, check=_check_megasmol, bind=_bind_megasmol),
        RolloutEngine("megatron-dynamic", "Megatron-Core's DynamicInferenceEngine over the same model: "
                      "continuous batching, paged KV cache; CUDA only, whole model per process",
                      reports_entropy=False, check=_check_megatron_dynamic, bind=_bind_megatron_dynamic),
    )
}


def rollout_engine(name: str) -> RolloutEngine:
    """The engine named ``name`` (``rl.engine``)."""
    try:
        return ROLLOUT_ENGINES[name]
    except KeyError:
        raise ConfigError(f"rl.engine must be one of {', '.join(ROLLOUT_ENGINES)}, got {name!r}") from None
