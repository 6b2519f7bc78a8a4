"""Config dry-run: every constraint of a run config checked, and per-GPU memory estimated.

The model is built on the meta device (Megatron-Core's real layers, no storage) to count its
parameters; the per-rank share follows the layout: tensor parallelism splits the attention and
MLP matrices and the vocabulary, pipeline parallelism splits the layers (the first stage holds the
embedding, the last the output layer, and a tied output layer costs the last stage a copy).

Memory per GPU, for the busiest rank:

* weights: parameters x 2 bytes (bf16) or 4 (fp32);
* gradients: parameters x 4 (Megatron DDP accumulates and reduces them in fp32);
* optimizer: fp32 master weights (bf16 runs) + Adam's two moments = 12 (or 8) bytes per parameter,
  divided by DP with the distributed optimizer;
* activations per layer and micro-batch, bf16, with flash-style attention (no s^2 scores)
  (Korthikanti et al. 2022, arXiv 2205.05198, redone for GQA and SwiGLU): per token, the layer
  input and both norm outputs and the residual (4h), Q and the attention output (2 q_dim), K and V
  (2 kv_dim), the gate+up projection (2f) and the SwiGLU output (f): 2 bytes each. Divided by TP
  with sequence parallelism; without it the 4h norm/residual part is replicated. Full recompute
  keeps only each layer's input (plus one layer's full set while it is recomputed). Context
  parallelism divides the tokens of each sequence over its ranks, except on the sdpa backend,
  whose CP all-gathers K and V: every layer keeps the whole sequence's K and V for backward
  (one layer's with full recompute), plus one transient copy for their gradient. The first
  pipeline stage holds min(PP, micro-batches) micro-batches in flight (1F1B);
* logits: tokens x vocab/TP x 10 bytes on the last stage (bf16 logits, the fp32 copy the
  cross-entropy makes, and its fp32 softmax);
* a fixed allowance for the CUDA context, communication buffers and allocator slack.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from megasmol.model.flops import parameter_count
from megasmol.model.run_spec import run_model_spec
from megasmol.preflight.report import CheckResult

GB = 1024 ** 3
FRAMEWORK_OVERHEAD_GB = 3.0


@dataclass
class MemoryEstimate:
    params_per_rank: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    overhead: float = FRAMEWORK_OVERHEAD_GB * GB
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def breakdown(self) -> dict[str, float]:
        return {"weights": self.weights / GB, "gradients": self.gradients / GB,
                "optimizer": self.optimizer / GB, "activations": self.activations / GB,
                "logits": self.logits / GB, "overhead": self.overhead / GB, "total": self.total / GB}


def meta_parameter_count(spec) -> int:
    """Parameters of the real Megatron-Core model, built on the meta device (TP=PP=1)."""
    from megatron.core import parallel_state

    from megasmol.config.parallel import ParallelLayout
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import init_parallel

    if not parallel_state.model_parallel_is_initialized():
        init_parallel(ParallelLayout(), spec)
    if parallel_state.get_tensor_model_parallel_world_size() != 1 or \
            parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("the meta build needs a TP=1, PP=1 parallel state")
    with torch.device("meta"):
        model = build_model(spec.replace(attention_backend="sdpa"), params_dtype=torch.bfloat16,
                            cpu_initialization=True, initialize=False)
    return sum(p.numel() for p in model.parameters())


def stage_parameters(spec, tp: int, pp: int) -> tuple[int, int]:
    """Parameters on one rank of the first and of the last pipeline stage."""
    counts = parameter_count(spec)
    replicated = 2 * spec.hidden_size + (2 * spec.kv_channels if spec.qk_norm else 0)  # norms
    layers = (spec.num_layers // pp) * ((counts.per_layer - replicated) / tp + replicated)
    vocab = counts.embedding / tp
    if pp == 1:
        whole = vocab + layers + counts.final_norm + (0 if spec.tie_embeddings else vocab)
        return int(whole), int(whole)
    # With PP > 1 the last stage holds the output layer (a copy of a tied embedding).
    return int(vocab + layers), int(layers + counts.final_norm + vocab)


def estimate_memory(spec, *, tp: int, pp: int, dp: int, micro_batch: int, seq_length: int, cp: int,
                    num_micro_batches: int, precision: str, distributed_optimizer: bool,
                    sequence_parallel: bool, recompute: Optional[str],
                    gathers_kv: bool = False) -> MemoryEstimate:
    """The estimate for the busiest rank (first or last pipeline stage).

    ``gathers_kv``: context parallelism all-gathers K and V (the sdpa backend) instead of
    passing them round a ring (Transformer Engine), so each rank holds the full sequence's.
    """
    weight_bytes = 4 if precision == "fp32" else 2
    optimizer_bytes = 8 if precision == "fp32" else 12
    h, f = spec.hidden_size, spec.ffn_hidden_size
    q_dim = spec.num_attention_heads * spec.kv_channels
    kv_dim = spec.num_kv_heads * spec.kv_channels
    replicated = 4 * h  # layer input, two norm outputs, residual
    split = 2 * q_dim + 2 * kv_dim + 3 * f
    per_token = 2 * ((replicated / tp if sequence_parallel else replicated) + split / tp)
    tokens = micro_batch * seq_length / cp  # context parallelism splits every sequence
    layers = spec.num_layers // pp
    if recompute == "full":
        kept = 2 * (h / tp if sequence_parallel else h)
        per_micro = tokens * (layers * kept + per_token)
    else:
        per_micro = tokens * layers * per_token
    gathered = 0.0
    if gathers_kv and cp > 1:
        # K and V of the other CP ranks' tokens (the local share is in per_token already).
        other_tokens = micro_batch * seq_length - tokens
        per_layer = other_tokens * 2 * (2 * kv_dim / tp)
        gathered = per_layer * ((1 if recompute == "full" else layers) + 1)
        per_micro += gathered
    first, last = stage_parameters(spec, tp, pp)
    estimates = []
    for params, in_flight, has_logits in ((first, min(pp, num_micro_batches), pp == 1),
                                          (last, 1, True)):
        estimates.append(MemoryEstimate(
            params_per_rank=params,
            weights=params * weight_bytes,
            gradients=params * 4,
            optimizer=params * optimizer_bytes / (dp if distributed_optimizer else 1),
            activations=per_micro * in_flight,
            logits=tokens * spec.vocab_size / tp * 10 if has_logits else 0.0,
            notes=[f"{params:,} parameters on this rank", f"{in_flight} micro-batch(es) in flight"]
            + ([f"context parallel all-gathered K/V: {gathered / GB:.2f} GB per micro-batch"]
               if gathered else [])))
    return max(estimates, key=lambda e: e.total)


def host_memory_bytes() -> float:
    """This machine's physical memory."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_memory_bytes(override_gb: Optional[float], precision: Optional[str] = None,
                        ) -> tuple[float, str]:
    """What one rank's share is compared against, and the words for it. Without a GPU an fp32
    run is a CPU run (the CPU examples), measured against this machine's memory; a bf16/fp8 run
    checked here is for a GPU cluster, so an H100 is assumed and said to be."""
    if override_gb is not None:
        return override_gb * GB, f"{override_gb:g} GB (given)"
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
        return float(total), f"{total / GB:.0f} GB ({torch.cuda.get_device_name()})"
    if precision == "fp32":
        total, local = host_memory_bytes(), max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        shared = f", shared by {local} processes" if local > 1 else ""
        return total / local, (f"{total / GB:.0f} GB (this machine's memory{shared}: "
                               "training.precision=fp32 is a CPU run; set --device-memory-gb for "
                               "another machine's)")
    return 80.0 * GB, "80 GB (assumed: an H100; no GPU here, set --device-memory-gb)"


def runs_on_cpu(precision: str) -> bool:
    """An fp32 config checked without a GPU: a CPU run (processes, host memory)."""
    return precision == "fp32" and not torch.cuda.is_available()


def planned_attention_backend(requested: str, precision: str) -> tuple[str, str]:
    """The backend the run will use, and a remark when it is a guess.

    An explicit backend is taken as given (TE installed here or not). ``auto`` resolves as
    training will when this machine has a GPU, or when the run is fp32 (a CPU run, checked where
    it will run). A bf16/fp8 run checked without a GPU (a login node, a laptop) is meant for the
    cluster, where ``auto`` means Transformer Engine: te is assumed, and the remark says so.
    """
    from megasmol.model.layer_specs import resolve_attention_backend

    if requested != "auto":
        return requested, ""
    if torch.cuda.is_available() or precision == "fp32":
        return resolve_attention_backend("auto"), ""
    return "te", " (auto, assumed for the GPU cluster; set training.attention_backend to check another)"


def dry_run(config, world_size: int, device_memory_gb: Optional[float] = None) -> list[CheckResult]:
    """Validate ``config`` (a RunConfig) for ``world_size`` ranks and estimate its memory."""
    from megasmol.config.typed import ConfigError
    from megasmol.train.setup import check_attention_layout

    try:
        spec = run_model_spec(config)
        backend, assumed = planned_attention_backend(spec.attention_backend,
                                                     config.training.precision)
        check_attention_layout(config, backend)
        layout = config.parallel
        layout.check(world_size, spec, config.data.seq_length)
        dp = layout.data_parallel(world_size)
        micro = config.training.micro_batches_per_step(dp)
    except ConfigError as exc:
        return [CheckResult("dry_run", "fail", str(exc), "config")]
    counted = meta_parameter_count(spec)
    expected = parameter_count(spec).total
    rows = []
    if counted != expected:
        rows.append(CheckResult("dry_run", "warn", f"meta-built model has {counted:,} parameters, the "
                                f"spec formula {expected:,}", "config"))
    estimate = estimate_memory(
        spec, tp=layout.tensor_parallel, pp=layout.pipeline_parallel, dp=dp, cp=layout.context_parallel,
        micro_batch=config.training.micro_batch_size, seq_length=config.data.seq_length,
        num_micro_batches=micro, precision=config.training.precision,
        distributed_optimizer=config.optim.distributed,
        sequence_parallel=layout.sequence_parallel and layout.tensor_parallel > 1,
        recompute=config.training.recompute,
        gathers_kv=backend == "sdpa")
    capacity, described = device_memory_bytes(device_memory_gb, config.training.precision)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in estimate.breakdown().items() if k != "total")
    share = estimate.total / capacity
    status = "fail" if share > 1 else "warn" if share > 0.9 else "pass"
    unit = "process" if runs_on_cpu(config.training.precision) else "GPU"
    summary = (f"{spec.name}: TP{layout.tensor_parallel} PP{layout.pipeline_parallel} "
               f"CP{layout.context_parallel} DP{dp}, {backend} attention{assumed}, "
               f"{micro} micro-batch(es)/step; "
               f"~{estimate.total / GB:.1f} GB per {unit} of {described} ({parts} GB)")
    details = {"breakdown_gb": estimate.breakdown(), "params_meta_built": counted,
               "params_per_rank": estimate.params_per_rank, "world_size": world_size,
               "device_memory_gb": capacity / GB, "notes": estimate.notes}
    rows.append(CheckResult("dry_run", status, summary, "config", details))
    return rows
