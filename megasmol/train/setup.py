"""Everything a run needs before its first step, built in a fixed order that fails fast.

1. the config against the world size and model (layout, batch geometry, precision);
2. Megatron-Core's parallel state;
3. the data audit on rank 0 (missing files, vocabulary, EOS) before anything heavy;
4. the stage datasets (Megatron's index builders, cached);
5. the model (fresh, or ``init_from`` weights), wrapped in Megatron DDP, and its optimizer
   (a ``branch_from`` source's model and optimizer state are loaded by the trainer, as a resume).
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional, TypeVar, Union

import torch

from megasmol.config.run import RunConfig
from megasmol.config.typed import ConfigError
from megasmol.data.loader import TrainingBatches
from megasmol.data.masking import BACKEND_MASK_FORMAT
from megasmol.data.recipe import DataRecipe, StagePlan, batch_schedule, load_recipe, plan_stages
from megasmol.model.layer_specs import resolve_attention_backend
from megasmol.model.run_spec import run_model_spec
from megasmol.model.spec import ModelSpec
from megasmol.runtime.distributed import RankInfo, init_distributed, init_parallel
from megasmol.train.branch import BranchPoint, apply_to_schedule, branch_point
from megasmol.train.objectives import Objective, ObjectiveKind, TokenLoss, objective_kind
from megasmol.train.optimizer import build_optimizer, ddp_distributed_optimizer, wrap_ddp
from megasmol.utils.faults import NO_FAULTS, FaultPlan, fault_plan
from megasmol.utils.fs import shown_paths

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.optimizer import MegatronOptimizer

    from megasmol.model.gpt import SmolGPTModel
    from megasmol.rl.batches import RolloutBatches

T = TypeVar("T")
Batches = Union[TrainingBatches, "RolloutBatches"]
"""A run's batch source: dataset micro-batches, or RL rollouts (``rl.batches``)."""

log = logging.getLogger(__name__)

PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass
class TrainingSetup:
    config: RunConfig
    spec: ModelSpec
    rank: RankInfo
    batches: Batches
    model: SmolGPTModel
    """This rank's model chunk."""
    ddp_model: DistributedDataParallel
    """The chunk (in Float16Module for bf16) in Megatron-Core's DDP: what the schedules run."""
    optimizer: MegatronOptimizer
    mask_format: str
    params_dtype: torch.dtype
    branch: Optional[BranchPoint] = None
    objective: Objective = field(default_factory=TokenLoss)
    """What a micro-batch's output becomes (``training.objective``: next-token loss, or a
    preference loss on pairs)."""
    faults: FaultPlan = NO_FAULTS
    """The tests' ``utils.faults.FaultPlan`` (``MEGASMOL_FAULT``); ``NO_FAULTS`` in production:
    the step and the checkpointer call its seams."""
    scopes: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    """Contexts held for the run (the preference objective's plain cross-entropy), left by
    :meth:`close`."""

    @property
    def is_logging_rank(self) -> bool:
        return self.rank.rank == 0

    def hold(self, context: AbstractContextManager[T]) -> T:
        """Enter ``context`` for the rest of the run."""
        return self.scopes.enter_context(context)

    def close(self) -> None:
        self.scopes.close()


def _check_precision(config: RunConfig, spec: ModelSpec) -> None:
    if config.training.precision != "fp8":
        return
    if resolve_attention_backend(spec.attention_backend) != "te":
        raise ConfigError("training.precision=fp8 needs Transformer Engine: the model's "
                          "attention_backend resolves to something other than te here")
    if torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError("training.precision=fp8 needs an Ada/Hopper or newer GPU "
                          f"(this one is sm_{''.join(map(str, torch.cuda.get_device_capability()))})")


def check_attention_layout(config: RunConfig, backend: str) -> None:
    """The parallel layout works with the (resolved) attention ``backend``, or a ConfigError.

    Context parallelism runs only where it gives right answers:

    * ``te``: Transformer Engine's ring attention; with document masking, packed THD sequences
      whose documents are padded to 2 x CP (x TP) tokens, which changes the micro-batch length
      from step to step, so not under pipeline parallelism (fixed p2p shapes);
    * ``sdpa``: megasmol's all-gather-KV attention, causal or document-masked, any layout;
    * ``local``: Megatron-Core's reference attention has no context parallelism.

    Sequence parallelism needs te: Megatron-Core's torch norms (the local and sdpa specs without
    Apex) refuse it, as their weight gradients would not be reduced over the TP group.
    """
    parallel = config.parallel
    cp = parallel.context_parallel
    if cp > 1 and backend == "local":
        raise ConfigError(f"parallel.context_parallel={cp} needs attention_backend te (ring attention) "
                          "or sdpa (all-gather KV); Megatron-Core's local attention has none")
    if cp > 1 and backend == "te" and config.data.document_masking and parallel.pipeline_parallel > 1:
        raise ConfigError(f"parallel.context_parallel={cp} with data.document_masking and "
                          f"pipeline_parallel={parallel.pipeline_parallel} on the te backend: "
                          "padded packed sequences vary in length, which pipeline stages cannot "
                          "exchange; use training.attention_backend=sdpa, pipeline_parallel=1 or "
                          "data.document_masking=false")
    if parallel.sequence_parallel and parallel.tensor_parallel > 1 and backend != "te":
        raise ConfigError("parallel.sequence_parallel needs the te attention backend (Transformer "
                          f"Engine norms); attention_backend resolves to {backend!r} here, whose "
                          "torch norms Megatron-Core does not shard; set parallel.sequence_parallel=false")


def _audit_on_rank0(config: RunConfig, spec: ModelSpec, rank: int) -> None:
    """Rank 0 checks what it alone uses (the trackers) and audits the data; every rank learns
    the verdict, so all fail together."""
    from megasmol.data.audit import audit_run
    from megasmol.train.tracker_checks import tracker_problems

    verdict: list[Optional[str]] = [None]
    if rank == 0:
        problems = tracker_problems(config.logging)
        if problems:
            verdict[0] = "; ".join(problems)
        else:
            report = audit_run(config, spec)
            # the errors: once, in the raised line
            print(shown_paths(report.render(errors=False)), flush=True)
            verdict[0] = None if report.ok else "data audit failed: " + "; ".join(report.errors)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise ConfigError(verdict[0])


def _half_precision(model: SmolGPTModel, params_dtype: torch.dtype) -> torch.nn.Module:
    """bf16 runs: Megatron-Core's Float16Module casts every parameter (norms built by torch
    included) to bf16 and returns the loss in fp32; the optimizer keeps fp32 master weights."""
    if params_dtype == torch.float32:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


def build_setup(config: RunConfig, reference_logps: bool = True, audit: bool = True) -> TrainingSetup:
    """``reference_logps=False`` (pre-flight's timed steps): preference data train against zero
    reference log-probs, so no reference model is needed or scored. ``audit=False`` (an in-process
    restart, whose first attempt audited the same data): no data audit and no plan table again."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megasmol.ckpt.checkpoint import load_model_weights
    from megasmol.model.gpt import build_model

    spec = run_model_spec(config)
    branch = branch_point(config)
    apply_to_schedule(config, branch)
    recipe = load_recipe(config.recipe_reference())
    plans = plan_stages(recipe, config.training.train_steps, batch_schedule(config.training),
                        config.data.seq_length)
    longest = max(p.seq_length for p in plans)
    if longest > spec.max_position_embeddings:
        raise ConfigError(f"sequence length {longest} exceeds the model's max_position_embeddings "
                          f"{spec.max_position_embeddings}; raise rope.max_position_embeddings "
                          "(and usually rope.theta) for a long-context stage")
    check_attention_layout(config, resolve_attention_backend(spec.attention_backend))
    kind = objective_kind(config.objective)
    check_objective_data(kind, config, recipe, plans)
    kind.check(config, reference_logps)

    rank = init_distributed(config.training.collective_timeout_s)
    config.parallel.check(rank.world_size, spec, longest)
    dp = config.parallel.data_parallel(rank.world_size)
    config.training.micro_batches_per_step(dp)
    _check_precision(config, spec)
    init_parallel(config.parallel, spec, seed=config.training.seed, seq_length=longest,
                  timeout_s=config.training.collective_timeout_s)
    if audit:
        _audit_on_rank0(config, spec, rank.rank)

    batches = kind.batches(config, recipe, plans, spec, parallel_state.get_data_parallel_rank(), dp)

    params_dtype = PARAMS_DTYPE[config.training.precision]
    resuming = config.checkpoint.resume and (config.checkpoint_dir / "latest").is_file()
    # Always initialized, even when weights are loaded next: Megatron-Core marks tensor-parallel
    # weights (which the gradient norm relies on) only while initializing them.
    model = build_model(spec, params_dtype=params_dtype,
                        sequence_parallel=config.parallel.sequence_parallel,
                        recompute=config.training.recompute,
                        cross_entropy=config.training.cross_entropy,
                        fp8="hybrid" if config.training.precision == "fp8" else None)
    if config.checkpoint.init_from and not resuming:
        source = config.path(config.checkpoint.init_from)
        meta = load_model_weights(model, source)
        log.info("weights from %s (step %s); optimizer, schedule and data start fresh",
                 source, meta.get("step"))
    # Token-weighted loss over the global batch (see step.py); set before DDP reads it.
    model.config.calculate_per_token_loss = True
    ddp_model = wrap_ddp(_half_precision(model, params_dtype), ddp_distributed_optimizer(config.optim))
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(ddp_model, config.optim, params_dtype)
    setup = TrainingSetup(config=config, spec=spec, rank=rank, batches=batches, model=model,
                          ddp_model=ddp_model, optimizer=optimizer,
                          mask_format=BACKEND_MASK_FORMAT[resolve_attention_backend(spec.attention_backend)],
                          params_dtype=params_dtype, branch=branch, faults=fault_plan())
    setup.objective = kind.build(setup, resuming=resuming, needed=reference_logps)
    return setup


def check_objective_data(kind: ObjectiveKind, config: RunConfig, recipe: DataRecipe,
                         plans: list[StagePlan]) -> None:
    """Every dataset the run reads is data ``kind`` trains on, or a ConfigError naming
    ``training.objective`` and the first dataset that is not (and the objective it is for)."""
    from megasmol.train.objectives import OBJECTIVES

    root = config.data.root and str(config.path(config.data.root))
    for plan in plans:
        for entry in plan.stage.datasets:
            prefix = recipe.dataset_prefix(entry, root)
            if kind.takes(prefix):
                continue
            chosen = (f"training.objective={kind.name}" if config.training.objective is not None else
                      f"training.objective={kind.name} (the default "
                      f"{'with' if kind.name == 'preference' else 'without'} a preference: section)")
            fits = [other for other in OBJECTIVES.values() if other.takes(prefix)]
            what = f"not: it is {fits[0].data}" if fits else "not"
            instead = ""
            if fits:
                drop = " (and no preference: section)" if "preference" in config.given_sections else ""
                instead = f", or set training.objective: {fits[0].name}{drop}"
            raise ConfigError(f"{chosen} trains on {kind.data}, but data recipe {recipe.name} reads "
                              f"{prefix}, which is {what}; give the run a recipe of such data alone"
                              + instead)


def run_directory(config: RunConfig) -> Path:
    return config.path(config.run_dir)
