"""Megatron-Core 0.16.1's ``DynamicInferenceEngine`` over a model already in memory (CUDA only):
the second rollout engine (``rl.engine: megatron-dynamic``), behind the interface of
:func:`megasmol.decode.cached.generate` (prompt ids in; each completion's ids, the log-probability
of each sampled token and why it ended out).

The engine runs the trainer's own ``GPTModel`` (no weight copy): continuous batching (rows leave
and join the batch every step), a paged KV cache of 256-token blocks, and Megatron-Core's flash
attention kernels for mixed prefill and decode steps. What it is asked for per request:
``return_log_probs`` with ``skip_prompt_log_probs`` (the log-softmax of the logits each sampled
token was drawn from), ``termination_id`` (the model's EOS), the other stop ids as one-token stop
words, and ``num_tokens_to_generate``.

Built by reading Megatron-Core 0.16.1's source; what it does differently from megasmol's decoder
(``docs/rl.md``, "The Megatron-Core engine"):

* **Temperature.** Megatron-Core divides a copy of the logits by the temperature to sample but
  returns the log-softmax of the undivided ones. Here the output layer's logits are divided by
  the temperature while the engine runs (a forward hook) and the engine samples at temperature 1:
  its log-probabilities are then ``log_softmax(logits / T)``, the trainer's.
* **Seeds.** The engine has one sampling generator (``TextGenerationController.sampling_rng``, on
  the GPU) for all requests, drawn from in batch order. It is reseeded at each call from all of
  the call's seeds, so a call repeats exactly (the same prompts, seeds and batch); a single
  completion does not depend on its own seed alone as with megasmol's decoder.
* **top_k with top_p.** Megatron-Core refuses both at once; ``top_p`` keeps the token that crosses
  the threshold when the cumulated probability before it is exactly ``top_p`` (megasmol's drops
  it): a tie of measure zero.
* **Entropies.** Not computed (the engine keeps no full distribution): the ``entropy`` metric is
  not logged with this engine.
* **Layouts.** One process holds the whole model (data parallelism only): the engine's own tensor
  and pipeline parallelism must run every model-parallel rank in lockstep through its ZMQ
  coordinator, which this adapter does not set up.
* **CUDA graphs.** They are captured only when the model's ``TransformerConfig`` asks for them,
  and that config is the trainer's: not turned on here.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch

from megasmol.decode.completion import Completion, request_limits
from megasmol.decode.sampling import SamplingParams
from megasmol.errors import RunFailure

BLOCK_TOKENS = 256
"""Tokens per block of the paged KV cache (Megatron-Core's default)."""


def call_seed(seeds: Sequence[int]) -> int:
    """One seed for the engine's single generator from all of a call's per-request seeds."""
    digest = hashlib.blake2b(",".join(str(int(s)) for s in seeds).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def megatron_sampling(params: SamplingParams, max_new_tokens: int, eos_token_id: Optional[int],
                      stop_ids: Sequence[int]) -> Any:
    """megasmol's sampling rule as Megatron-Core's ``SamplingParams`` (the temperature is applied
    to the logits by :func:`divided_logits`, so the engine's is 1)."""
    from megatron.core.inference.sampling_params import SamplingParams as MegatronSampling

    if params.top_k > 0 and params.top_p < 1:
        raise ValueError("Megatron-Core's engine takes top_k or top_p, not both")
    return MegatronSampling(
        temperature=1.0,
        top_k=1 if params.greedy else params.top_k,
        top_p=0.0 if params.greedy or params.top_p >= 1 else float(params.top_p),  # 0: off
        return_log_probs=True, skip_prompt_log_probs=True,
        num_tokens_to_generate=max_new_tokens,
        termination_id=-1 if eos_token_id is None else int(eos_token_id),
        stop_words=[str(int(i)) for i in stop_ids] or None)


@contextlib.contextmanager
def divided_logits(model, temperature: float) -> Iterator[None]:
    """Within it, ``model``'s output layer returns ``logits / temperature`` (no-op at 0 or 1)."""
    if temperature in (0, 1):
        yield
        return
    layer = _unwrapped(model).output_layer

    def hook(module, args, output):
        logits, bias = output
        return logits / temperature, bias

    handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class _StopIdsTokenizer:
    """The tokenizer the controller asks for: stop words are token ids written in decimal (one
    id each); no text is made (the rewards decode the ids themselves)."""

    bos = None

    def __init__(self, eod: int):
        self.eod = eod

    def tokenize(self, text: str) -> list[int]:
        return [int(text)]

    def detokenize(self, ids, skip_special_tokens: bool = False) -> str:
        return ""


def kv_block_bytes(model, params_dtype: torch.dtype) -> int:
    """Bytes of one KV-cache block: keys and values of every layer for ``BLOCK_TOKENS`` tokens."""
    config = _unwrapped(model).config
    heads = config.num_query_groups or config.num_attention_heads
    return 2 * params_dtype.itemsize * config.num_layers * BLOCK_TOKENS * heads * config.kv_channels


def generate_dynamic(model, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
                     sampling: SamplingParams, seeds: Sequence[int], eos_token_id: Optional[int],
                     stop_ids: Sequence[int] = ()) -> list[Completion]:
    """Each prompt's completion by Megatron-Core's dynamic engine, sized for this call (a KV cache
    with room for every request at its full length, so no request is paused or evicted)."""
    from megatron.core.inference.contexts.dynamic_context import DynamicInferenceContext
    from megatron.core.inference.engines.dynamic_engine import DynamicInferenceEngine
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
        GPTInferenceWrapper,
    )
    from megatron.core.inference.model_inference_wrappers.inference_wrapper_config import (
        InferenceWrapperConfig,
    )
    from megatron.core.inference.text_generation_controllers.text_generation_controller import (
        TextGenerationController,
    )

    limits = request_limits(prompts, max_new_tokens)
    if not prompts:
        return []
    inner = _unwrapped(model)
    config = inner.config
    dtype = config.params_dtype
    longest = max(len(p) + n for p, n in zip(prompts, limits))
    rounder = DynamicInferenceContext.REQUEST_ROUNDER
    requests = math.ceil(len(prompts) / rounder) * rounder
    # every request's blocks at its full length, one more per request slot and the dummy block
    # (the bytes are rounded down to whole blocks by the context)
    blocks = sum(math.ceil((len(p) + n) / BLOCK_TOKENS) for p, n in zip(prompts, limits)) + requests + 2
    context = DynamicInferenceContext(
        params_dtype=dtype, num_layers=config.num_layers, kv_channels=config.kv_channels,
        num_attention_heads=config.num_query_groups or config.num_attention_heads,
        max_sequence_length=longest, buffer_size_gb=(blocks + 0.5) * kv_block_bytes(model, dtype) / 1024**3,
        block_size_tokens=BLOCK_TOKENS, max_requests=requests,
        max_tokens=max(DynamicInferenceContext.DEFAULT_MAX_TOKENS, requests,
                       math.ceil(max(len(p) for p in prompts) / 64) * 64),
        materialize_only_last_token_logits=True)
    wrapper = GPTInferenceWrapper(inner, InferenceWrapperConfig(
        hidden_size=config.hidden_size, params_dtype=dtype, inference_batch_times_seqlen_threshold=-1,
        padded_vocab_size=inner.vocab_size, inference_max_requests=requests,
        inference_max_seq_length=longest), context)
    stops = sorted({int(i) for i in stop_ids} - {eos_token_id})
    eod = -1 if eos_token_id is None else int(eos_token_id)
    controller = TextGenerationController(wrapper, _StopIdsTokenizer(eod))
    engine = DynamicInferenceEngine(controller, context, random_seed=call_seed(seeds),
                                    enable_chunked_prefill=False)
    controller.sampling_rng.manual_seed(call_seed(seeds))
    for row, (prompt, limit) in enumerate(zip(prompts, limits)):
        engine.add_request(row, list(prompt), megatron_sampling(sampling, limit, eos_token_id, stops))
    records = {}
    training = model.training
    model.eval()
    try:
        with divided_logits(model, sampling.temperature if not sampling.greedy else 1.0):
            while engine.has_unfinished_requests():
                for record in engine.step_modern()["finished_request_records"]:
                    records[record.request_id] = record.merge()
    finally:
        model.train(training)
    return [_completion(records.get(row), row, limit, eos_token_id, set(stops))
            for row, limit in enumerate(limits)]


def _completion(request, row: int, limit: int, eos_token_id: Optional[int], stops: set[int]) -> Completion:
    from megatron.core.inference.inference_request import Status

    if request is None or request.status == Status.FAILED:
        raise RunFailure(f"Megatron-Core's dynamic engine failed request {row} "
                         f"({'no result' if request is None else request.events})")
    tokens = [int(t) for t in request.generated_tokens]
    # A stop word ends its request one engine step late: the ids (and log-probs) after it go.
    for at, token in enumerate(tokens):
        if token == eos_token_id or token in stops:
            tokens = tokens[:at + 1]
            break
    logps = [float(x) for x in (request.generated_log_probs or [])][:len(tokens)]
    if len(logps) != len(tokens):
        raise RunFailure(f"Megatron-Core's dynamic engine returned {len(logps)} log-probs for "
                         f"{len(tokens)} tokens of request {row}")
    if tokens and tokens[-1] == eos_token_id:
        reason = "eos"
    elif tokens and tokens[-1] in stops:
        reason = "stop"
    else:
        reason = "length"
    return Completion(tokens, logps, reason)


def _unwrapped(model):
    from megatron.core.utils import unwrap_model

    return unwrap_model(model)
