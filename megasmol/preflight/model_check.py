"""The pre-flight model check: the run's own model on this node, before the job spends its hours.

1. ``model_parity``: the run's model (its first ``PARITY_LAYERS`` layers, so any size fits one
   device) built with the attention backend the run will use, and the same weights with a second
   implementation (``sdpa``; ``local`` when the run itself uses sdpa): per-token loss and every
   gradient on a fixed batch of packed documents with document masking must agree within the
   precision's tolerance. On a GPU node with Transformer Engine that is TE's fused attention and
   norms against PyTorch SDPA in bf16 (and, for an fp8 run, the mean loss with FP8 GEMMs against
   BF16 within ``FP8_LOSS_TOLERANCE``); on a CPU it is SDPA against Megatron-Core's reference
   attention in fp32, so CI runs the same code.
2. ``training_throughput``: a few real training steps of the run (its data, layout over this
   job's ranks, precision, ``optim.name`` with its sharding), timed after a warm-up, as tokens/s
   per device and MFU, against ``logging.expected_tokens_per_s_per_gpu`` (FAIL below
   ``tolerance`` of it) and against the GEMM burn measured in the same pre-flight (the share of
   the burn's FLOP/s the model gets).
"""

from __future__ import annotations

import time
from typing import Optional

import torch

from megasmol.model.run_spec import run_model_spec
from megasmol.preflight.report import CheckResult

PARITY_LAYERS = 4
PARITY_SEQ = 256
# Tolerances: fp32 is exact up to summation order; bf16 kernels differ in accumulation order and
# fusion (TE vs PyTorch), so their per-token losses agree to a few hundredths.
TOLERANCES = {torch.float32: {"loss": 1e-4, "grad": 1e-3},
              torch.bfloat16: {"loss": 5e-2, "grad": 5e-2}}
FP8_LOSS_TOLERANCE = 0.02
"""FP8 GEMMs (delayed scaling) vs BF16 on the same weights: mean loss within 2%."""
WARMUP_STEPS = 2
TIMED_STEPS = 3


def _parity_spec(spec):
    from megasmol.config.typed import ConfigError

    if spec.num_layers <= PARITY_LAYERS:
        return spec
    try:
        return spec.replace(num_layers=PARITY_LAYERS)
    except ConfigError:  # e.g. an explicit NoPE layer list: the whole model
        return spec


def _batch(spec, seq: int, device) -> dict:
    generator = torch.Generator().manual_seed(17)
    tokens = torch.randint(0, spec.vocab_size, (2, seq + 1), generator=generator)
    tokens[tokens == spec.eos_token_id] = (spec.eos_token_id + 1) % spec.vocab_size
    for row, cuts in enumerate(((seq // 5, seq // 2), (seq // 3,))):  # uneven documents per row
        for cut in cuts:
            tokens[row, cut] = spec.eos_token_id
    return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(2, seq, device=device),
            "position_ids": torch.arange(seq, device=device).unsqueeze(0).expand(2, -1).contiguous()}


def _loss_and_grads(model, inputs):
    from megasmol.model.load import canonical_parameters

    model.zero_grad()
    loss = model(inputs.tokens, inputs.position_ids, inputs.attention_mask, labels=inputs.labels,
                 packed_seq_params=inputs.packed_seq_params)
    loss = loss.reshape(-1).float()
    loss.sum().backward()
    grads = {key: param.grad.detach().float().clone()
             for key, param in _named_canonical(model, canonical_parameters).items()
             if param.grad is not None}
    return loss.detach(), grads


def _named_canonical(model, canonical_parameters):
    """(key, layer) -> the nn.Parameter (canonical_parameters gives the tensors)."""
    by_id = {id(p): p for p in model.parameters()}
    out = {}
    for key, tensor in canonical_parameters(model).items():
        param = by_id.get(id(tensor))
        if param is not None:
            out[key] = param
    return out


def _fp8_loss_gap(spec, dtype, bf16_model, batch, backend) -> float:
    """|mean loss with FP8 GEMMs - mean loss in BF16| / mean BF16 loss, same weights and batch
    (the FP8 model as training builds it: Megatron-Core's hybrid E4M3/E5M2 recipe)."""
    from megasmol.data.masking import BACKEND_MASK_FORMAT, model_inputs
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import current_device

    fp8_model = build_model(spec.replace(attention_backend=backend), params_dtype=dtype,
                            fp8="hybrid", initialize=False).to(current_device())
    copy_weights(bf16_model, fp8_model)
    inputs = model_inputs(batch, spec.eos_token_id, True, BACKEND_MASK_FORMAT[backend])
    losses = []
    with torch.no_grad():
        for model in (bf16_model, fp8_model):
            out = model(inputs.tokens, inputs.position_ids, inputs.attention_mask, labels=inputs.labels,
                        packed_seq_params=inputs.packed_seq_params)
            losses.append(float(out.float().mean()))
    return abs(losses[1] - losses[0]) / max(abs(losses[0]), 1e-12)


def copy_weights(source, target) -> None:
    """The same weights in another backend's model (matched by checkpoint key and layer)."""
    from megasmol.model.load import canonical_parameters

    with torch.no_grad():
        targets = canonical_parameters(target)
        for key, tensor in canonical_parameters(source).items():
            targets[key].copy_(tensor)


def model_parity(config) -> CheckResult:
    from megasmol.config.parallel import ParallelLayout
    from megasmol.data.masking import BACKEND_MASK_FORMAT, model_inputs
    from megasmol.model.gpt import build_model
    from megasmol.model.layer_specs import resolve_attention_backend
    from megasmol.runtime.distributed import current_device, init_parallel

    spec = _parity_spec(run_model_spec(config))
    backend = resolve_attention_backend(spec.attention_backend)
    reference = "local" if backend == "sdpa" else "sdpa"
    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu and config.training.precision != "fp32" else torch.float32
    init_parallel(ParallelLayout(), spec, seed=config.training.seed)
    device = current_device()
    run_model = build_model(spec.replace(attention_backend=backend), params_dtype=dtype).to(device)
    ref_model = build_model(spec.replace(attention_backend=reference), params_dtype=dtype,
                            initialize=False).to(device)
    copy_weights(run_model, ref_model)
    seq = min(PARITY_SEQ, spec.max_position_embeddings)
    batch = _batch(spec, seq, device)
    results = {}
    for name, model in (("run", run_model), ("reference", ref_model)):
        chosen = backend if name == "run" else reference
        inputs = model_inputs(batch, spec.eos_token_id, True, BACKEND_MASK_FORMAT[chosen])
        results[name] = _loss_and_grads(model, inputs)
    (loss_a, grads_a), (loss_b, grads_b) = results["run"], results["reference"]
    loss_diff = float((loss_a - loss_b).abs().max())
    worst_key, worst = None, 0.0
    for key, grad in grads_a.items():
        other = grads_b.get(key)
        if other is None:
            continue
        relative = float((grad - other).norm() / other.norm().clamp_min(1e-12))
        if relative >= worst:
            worst_key, worst = key, relative
    tolerance = TOLERANCES[dtype]
    ok = loss_diff <= tolerance["loss"] and worst <= tolerance["grad"]
    fp8 = None
    if config.training.precision == "fp8" and backend == "te" and on_gpu:
        fp8 = _fp8_loss_gap(spec, dtype, run_model, batch, backend)
        ok = ok and fp8 <= FP8_LOSS_TOLERANCE
    where = f"{worst_key[0]}" + (f"[layer {worst_key[1]}]" if worst_key and worst_key[1] is not None else "")
    summary = (f"{backend} vs {reference}, {spec.num_layers} layer(s), {str(dtype)[6:]}, packed documents: "
               f"per-token loss max diff {loss_diff:.2e} (tolerance {tolerance['loss']:g}), worst "
               f"gradient relative diff {worst:.2e} at {where} (tolerance {tolerance['grad']:g})")
    if fp8 is not None:
        summary += (f"; FP8 vs BF16 mean loss relative gap {fp8:.2e} "
                    f"(tolerance {FP8_LOSS_TOLERANCE:g})")
    elif config.training.precision == "fp8":
        summary += "; FP8 not compared (needs Transformer Engine on a GPU)"
    return CheckResult("model_parity", "pass" if ok else "fail", summary, "model",
                       {"backend": backend, "reference": reference, "layers": spec.num_layers,
                        "dtype": str(dtype), "loss_max_diff": loss_diff, "grad_max_rel_diff": worst,
                        "fp8_loss_rel_gap": fp8,
                        "worst_gradient": where, "tolerance": tolerance})


def training_throughput(config, *, tolerance: float, burn_tflops: Optional[float]) -> CheckResult:
    """A few real training steps of ``config`` on this job's ranks (collective)."""
    import contextlib
    import copy
    import io

    from megasmol.model.flops import flops_per_token
    from megasmol.train.setup import build_setup
    from megasmol.train.step import train_step

    config = copy.deepcopy(config)
    config.checkpoint.resume = False
    config.checkpoint.init_from = None
    config.checkpoint.branch_from = None
    config.eval.tasks = []
    with contextlib.redirect_stdout(io.StringIO()):  # the data audit's table: the dry run's job
        setup = build_setup(config, reference_logps=False)
    spec = setup.spec
    world = setup.rank.world_size
    times, tokens = [], 0
    for step, plan, micro in setup.batches.iterate(1, prefetch=0):
        if step > WARMUP_STEPS + TIMED_STEPS:
            break
        started = time.perf_counter()
        totals = train_step(setup, step, micro, config.schedule.lr * 1e-3).totals  # the trainer's step
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step > WARMUP_STEPS:
            times.append(time.perf_counter() - started)
            tokens += plan.batch.at(step) * plan.seq_length
    seconds = sum(times)
    per_device = tokens / seconds / world if seconds else 0.0
    seq = max(p.seq_length for p in setup.batches.plans)
    achieved_tflops = per_device * flops_per_token(spec, seq) / 1e12
    details = {"tokens_per_s_per_device": per_device, "model_tflops_per_device": achieved_tflops,
               "steps_timed": len(times), "world_size": world, "last_loss": totals.loss,
               "optimizer": type(setup.optimizer).__name__, "optim_name": config.optim.name}
    summary = (f"{len(times)} training step(s) after {WARMUP_STEPS} warm-up: "
               f"{per_device:,.0f} tokens/s per device, {achieved_tflops:.3g} model TFLOP/s per device")
    from megasmol.train.metrics import device_peak_tflops

    peak = device_peak_tflops(config.training.precision, config.logging.peak_tflops)
    if peak:
        details["mfu"] = achieved_tflops / peak
        summary += f", MFU {achieved_tflops / peak:.1%}"
    if burn_tflops:
        details["share_of_gemm_burn"] = achieved_tflops / burn_tflops
        summary += f" ({achieved_tflops / burn_tflops:.0%} of this node's GEMM burn)"
    expected = config.logging.expected_tokens_per_s_per_gpu
    status = "pass"
    if expected:
        details["expected_tokens_per_s_per_device"] = expected
        summary += f"; expected {expected:,.0f} ({per_device / expected:.0%})"
        if per_device < tolerance * expected:
            status = "fail"
            summary += f", below {tolerance:.0%} of it"
    return CheckResult("training_throughput", status, summary, "job", details)
