"""Everything a run needs before its first step, built in a fixed order that fails fast.

1. the config against the world size and model (layout, batch geometry, precision);
2. Megatron-Core's parallel state;
3. the data audit on rank 0 (missing files, vocabulary, EOS) before anything heavy;
4. the stage datasets (Megatron's index builders, cached);
5. the model (fresh, or ``init_from`` weights), wrapped in Megatron DDP, and its optimizer
   (a ``branch_from`` source's model and optimizer state are loaded by the trainer, as a resume).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megasmol.train.branch import BranchPoint, apply_to_schedule, branch_point
from megasmol.config.run import RunConfig
from megasmol.config.typed import ConfigError
from megasmol.data.loader import TokenIds, TrainingBatches, build_stage_data
from megasmol.data.masking import BACKEND_MASK_FORMAT
from megasmol.data.recipe import load_recipe, plan_stages
from megasmol.model.layer_specs import resolve_attention_backend
from megasmol.model.spec import ModelSpec
from megasmol.runtime.distributed import RankInfo, init_distributed, init_parallel
from megasmol.train.objectives import PreferenceLoss, TokenLoss
from megasmol.train.optimizer import build_optimizer, wrap_ddp
from megasmol.utils.faults import NO_FAULTS, fault_plan
from megasmol.utils.fs import shown_paths

log = logging.getLogger(__name__)

PARAMS_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}


@dataclass
class TrainingSetup:
    config: RunConfig
    spec: ModelSpec
    rank: RankInfo
    batches: TrainingBatches
    model: object  # this rank's model chunk (SmolGPTModel)
    ddp_model: object
    optimizer: object
    mask_format: str
    params_dtype: torch.dtype
    branch: Optional[BranchPoint] = None
    objective: object = field(default_factory=TokenLoss)
    """What a micro-batch's output becomes: next-token loss, or a preference loss on pairs."""
    faults: object = NO_FAULTS
    """The tests' ``utils.faults.FaultPlan`` (``MEGASMOL_FAULT``); ``NO_FAULTS`` in production:
    the step and the checkpointer call its seams."""

    @property
    def is_logging_rank(self) -> bool:
        return self.rank.rank == 0


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

    verdict = [None]
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


def _half_precision(model, params_dtype: torch.dtype):
    """bf16 runs: Megatron-Core's Float16Module casts every parameter (norms built by torch
    included) to bf16 and returns the loss in fp32; the optimizer keeps fp32 master weights."""
    if params_dtype == torch.float32:
        return model
    from megatron.core.transformer.module import Float16Module

    return Float16Module(model.config, model)


def build_setup(config: RunConfig, reference_logps: bool = True) -> TrainingSetup:
    """``reference_logps=False`` (pre-flight's timed steps): preference data train against zero
    reference log-probs, so no reference model is needed or scored."""
    from megatron.core import parallel_state
    from megatron.core.distributed import finalize_model_grads

    from megasmol.ckpt.checkpoint import load_model_weights
    from megasmol.model.gpt import build_model

    spec = config.model_spec()
    branch = branch_point(config)
    apply_to_schedule(config, branch)
    recipe = load_recipe(config.recipe_reference())
    plans = plan_stages(recipe, config.training.train_steps, config.training.batch_schedule(),
                        config.data.seq_length)
    longest = max(p.seq_length for p in plans)
    if longest > spec.max_position_embeddings:
        raise ConfigError(f"sequence length {longest} exceeds the model's max_position_embeddings "
                          f"{spec.max_position_embeddings}; raise rope.max_position_embeddings "
                          "(and usually rope.theta) for a long-context stage")
    check_attention_layout(config, resolve_attention_backend(spec.attention_backend))
    reference = preference_reference(config, recipe, plans, needed=reference_logps)

    rank = init_distributed(config.training.collective_timeout_s)
    config.parallel.check(rank.world_size, spec, longest)
    dp = config.parallel.data_parallel(rank.world_size)
    config.training.micro_batches_per_step(dp)
    _check_precision(config, spec)
    init_parallel(config.parallel, spec, seed=config.training.seed, seq_length=longest,
                  timeout_s=config.training.collective_timeout_s)
    _audit_on_rank0(config, spec, rank.rank)

    stages = build_stage_data(
        recipe, plans, TokenIds.from_spec(spec), seed=config.training.seed,
        cache_dir=config.cache_dir, root=config.data.root and str(config.path(config.data.root)),
        document_masking=config.data.document_masking,
        validation_fraction=config.data.validation_fraction, packing=config.data.packing,
        validation_samples=config.eval.steps * config.training.global_batch_size)
    batches = TrainingBatches(stages, config.training.micro_batch_size,
                              parallel_state.get_data_parallel_rank(), dp)

    params_dtype = PARAMS_DTYPE[config.training.precision]
    resuming = config.checkpoint.resume and (config.checkpoint_dir / "latest").is_file()
    # Always initialized, even when weights are loaded next: Megatron-Core marks tensor-parallel
    # weights (which the gradient norm relies on) only while initializing them.
    model = build_model(spec, params_dtype=params_dtype,
                        sequence_parallel=config.parallel.sequence_parallel,
                        recompute=config.training.recompute,
                        fp8="hybrid" if config.training.precision == "fp8" else None)
    if config.checkpoint.init_from and not resuming:
        source = config.path(config.checkpoint.init_from)
        meta = load_model_weights(model, source)
        log.info("weights from %s (step %s); optimizer, schedule and data start fresh",
                 source, meta.get("step"))
    # Token-weighted loss over the global batch (see step.py); set before DDP reads it.
    model.config.calculate_per_token_loss = True
    ddp_model = wrap_ddp(_half_precision(model, params_dtype), config.optim.distributed)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = build_optimizer(ddp_model, config.optim, params_dtype)
    setup = TrainingSetup(config=config, spec=spec, rank=rank, batches=batches, model=model,
                          ddp_model=ddp_model, optimizer=optimizer,
                          mask_format=BACKEND_MASK_FORMAT[resolve_attention_backend(spec.attention_backend)],
                          params_dtype=params_dtype, branch=branch, faults=fault_plan())
    if reference is False:
        setup.objective = PreferenceLoss(config.preference)
        setup.model.z_loss_coeff = 0.0
    elif reference is not None:
        _prepare_preference(setup, reference, resuming)
    return setup


def preference_reference(config: RunConfig, recipe, plans, needed: bool = True):
    """The reference checkpoint when the recipe's data are preference pairs (None otherwise; False
    for pairs when no reference is ``needed``); a recipe that mixes pairs with other data, pairs
    without a reference, or a ``preference:`` section over data that are not pairs (it would train
    next-token loss without a word) is refused here, before anything heavy."""
    from megasmol.data.preference.prepare import read_pref_description

    root = config.data.root and str(config.path(config.data.root))
    kinds = {}
    for plan in plans:
        for entry in plan.stage.datasets:
            prefix = recipe.dataset_prefix(entry, root)
            kinds[str(prefix)] = read_pref_description(prefix) is not None
    if not any(kinds.values()):
        if "preference" in config.given_sections:
            raise ConfigError(
                f"preference: is set but data recipe {recipe.name} holds no preference pairs "
                f"({next(iter(kinds))} is not prepare-preferences output), so the run would train "
                "plain next-token loss: prepare the pairs with `megasmol prepare-preferences`, or "
                "remove the preference: section")
        return None
    if not all(kinds.values()):
        other = next(p for p, pairs in kinds.items() if not pairs)
        raise ConfigError(f"data recipe {recipe.name} mixes preference pairs with other data ({other}): a "
                          "run trains one objective; put the preference data in a recipe of its own")
    source = config.preference.reference or config.checkpoint.init_from
    if not needed:
        return False
    if source is None:
        raise ConfigError("preference data need a reference model: set checkpoint.init_from (the SFT "
                          "checkpoint, also the default reference) or preference.reference")
    return config.path(source)


def _prepare_preference(setup: TrainingSetup, reference: Path, resuming: bool) -> None:
    """Preference pairs: the pair objective, the model's per-token output as plain CE (no z-loss:
    log-probs must be exact), and every pair's reference log-probs attached to the data."""
    from megasmol.train.reference import attach_reference_logps

    config = setup.config
    setup.objective = PreferenceLoss(config.preference)
    setup.model.z_loss_coeff = 0.0
    init_from = config.checkpoint.init_from and config.path(config.checkpoint.init_from)
    restore = init_from if (not resuming and init_from and init_from != reference) else None
    attach_reference_logps(setup, reference, weights_after=restore,
                           show_progress=config.logging.progress,
                           say=lambda line: print(shown_paths(line), flush=True))


def run_directory(config: RunConfig) -> Path:
    return config.path(config.run_dir)
