"""``megasmol rl check-engine``: on a GPU node, Megatron-Core's dynamic engine against megasmol's
own engine, on a run's model and prompts.

1. The run's model (``--checkpoint``, else ``checkpoint.init_from``) in the run's precision, the
   first ``--prompts`` prompts of its first stage, its sampling settings (``rl:``) and stop ids.
2. Megatron-Core's ``DynamicInferenceEngine`` samples one completion per prompt, with the
   log-probability of each token it sampled (timed: tokens/s).
3. megasmol's decoder samples the same prompts with the same settings (timed: tokens/s; its
   completions differ, its generator being another).
4. The trainer's computation scores Megatron-Core's completions teacher-forced: one forward pass
   per prompt and completion, the plain cross-entropy of ``logits / rl.temperature`` (the RL
   loss's log-probabilities, :class:`megasmol.train.objectives.rl.PolicyLoss`).
5. :func:`megasmol.rl.logp_agreement.compare_logps` of 2 against 4: the table and the verdict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megasmol.config.typed import ConfigError
from megasmol.rl.logp_agreement import LogpComparison, compare_logps, padded


@dataclass
class EngineTiming:
    """One engine's sampling of the prompts."""

    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def table(timings: list[EngineTiming], result: LogpComparison) -> list[str]:
    """The lines ``check-engine`` prints."""
    lines = [f"{'engine':<34} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}"]
    lines += [f"{t.name:<34} {t.tokens:>7} {t.seconds:>8.2f} {t.tokens_per_s:>9.1f}" for t in timings]
    lines += ["", f"log-probs of megatron-dynamic's {result.tokens} sampled tokens against the trainer's "
                  "(teacher-forced):",
              f"  max |dlogp|              {result.max_abs_diff:.3e}",
              f"  mean |dlogp|             {result.mean_abs_diff:.3e}",
              f"  token_mult_prob_error    {result.token_mult_prob_error:.4f}   "
              f"(pass: <= {result.threshold:g})",
              f"verdict: {'PASS' if result.passed else 'FAIL'}"]
    return lines


def check_engine(config_path: str, overrides: list[str], checkpoint: Optional[str], prompts: int,
                 threshold: float, say=print) -> bool:
    """Runs the check; True when it passes."""
    from megasmol.config.run import load_run_config
    from megasmol.train.rollout_engines import dynamic_engine_limits, needs_cuda

    needs_cuda("check-engine", "run it on a GPU node")
    config = load_run_config(config_path, overrides)
    if config.objective != "rl":
        raise ConfigError(f"{config_path}: training.objective is {config.objective}, not rl")
    dynamic_engine_limits(config, "check-engine (Megatron-Core's dynamic engine)")
    source = checkpoint or (config.checkpoint.init_from and str(config.path(config.checkpoint.init_from)))
    if not source:
        raise ConfigError("check-engine needs a model: pass --checkpoint or set "
                          "checkpoint.init_from in the run config")
    return _run(config, Path(source), prompts, threshold, say)


def _run(config, source: Path, count: int, threshold: float, say) -> bool:
    from megasmol.decode.cached import generate
    from megasmol.decode.megatron_dynamic import generate_dynamic
    from megasmol.decode.sampling import SamplingParams
    from megasmol.model.load import load_checkpoint_model
    from megasmol.rl.order import completion_seed
    from megasmol.runtime.distributed import current_device, shutdown
    from megasmol.train.objectives.rollout_setup import stop_ids
    from megasmol.train.setup import PARAMS_DTYPE

    rl = config.rl
    records, tokenizer = _prompts(config, count)
    try:
        model, spec, _ = load_checkpoint_model(source, params_dtype=PARAMS_DTYPE[config.training.precision])
        model.to(current_device())
        stops = stop_ids(tokenizer, spec.eos_token_id)
        sampling = SamplingParams(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k)
        prompts = [list(r.prompt_ids) for r in records]
        seeds = [completion_seed(config.training.seed, 1, 0, i, 0) for i in range(len(prompts))]
        say(f"{len(prompts)} prompts from {config.recipe_reference()}, model {source}, "
            f"{rl.max_completion_length} tokens at most, temperature {rl.temperature:g}")
        started = time.perf_counter()
        theirs = generate_dynamic(model, prompts, rl.max_completion_length, sampling=sampling, seeds=seeds,
                                  eos_token_id=spec.eos_token_id, stop_ids=sorted(stops))
        torch.cuda.synchronize()
        dynamic = EngineTiming("megatron-dynamic", sum(len(c.tokens) for c in theirs),
                               time.perf_counter() - started)
        started = time.perf_counter()
        ours = generate(model, prompts, rl.max_completion_length, sampling=sampling, seeds=seeds,
                        eos_token_id=spec.eos_token_id, stop=lambda row, ids: ids[-1] in stops)
        torch.cuda.synchronize()
        decoder = EngineTiming("megasmol", sum(len(c.tokens) for c in ours), time.perf_counter() - started)
        trainer = [teacher_forced_logps(model, p, c.tokens, rl.temperature) for p, c in zip(prompts, theirs)]
    finally:
        shutdown()
    reference, mask = padded(trainer)
    candidate, _ = padded([c.logprobs for c in theirs])
    result = compare_logps(reference, candidate, mask, threshold)
    for line in table([dynamic, decoder], result):
        say(line)
    return result.passed


@torch.no_grad()
def teacher_forced_logps(model, prompt: list[int], completion: list[int], temperature: float) -> list[float]:
    """The trainer's log-probability of each of ``completion``'s tokens after ``prompt``: the
    plain cross-entropy of ``logits / temperature`` in one forward pass (the RL loss's)."""
    from megasmol.model.gpt import plain_cross_entropy, sampling_temperature
    from megasmol.runtime.distributed import current_device

    if not completion:
        return []
    ids = torch.tensor([prompt + completion], dtype=torch.long, device=current_device())
    inputs, labels = ids[:, :-1], ids[:, 1:]
    positions = torch.arange(inputs.shape[1], device=ids.device).unsqueeze(0)
    with plain_cross_entropy(model), sampling_temperature(model, temperature), model.forward_only():
        loss = model(inputs, positions, None, labels=labels)  # [1, s] per-token cross-entropy
    return (-loss[0, len(prompt) - 1:]).float().tolist()


def _prompts(config, count: int):
    """The first ``count`` prompts of the run's first stage and the run's tokenizer."""
    from transformers import AutoTokenizer

    from megasmol.data.prompts.store import read_prompts
    from megasmol.data.recipe import load_recipe
    from megasmol.data.run_tokenizer import run_tokenizer_dir

    recipe = load_recipe(config.recipe_reference())
    root = config.data.root and str(config.path(config.data.root))
    prompt_set = read_prompts(recipe.dataset_prefix(recipe.stages[0].datasets[0], root))
    records = [prompt_set[i] for i in range(min(count, len(prompt_set)))]
    if not records:
        raise ConfigError(f"{config.recipe_reference()}: the first stage's prompt set is empty")
    source = run_tokenizer_dir(config) or prompt_set.tokenizer_dir
    return records, AutoTokenizer.from_pretrained(str(source))
