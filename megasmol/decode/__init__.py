"""Decoding: the one decoder that chat, evaluation and RL share.

* ``sampling``: ``SamplingParams`` (greedy, temperature, top_k, top_p) and ``choose`` (tokens
  and their log-probabilities, one ``torch.Generator`` per row).
* ``cached``: one process, the whole model, Megatron-Core's KV cache: ``Decoder`` (one sequence,
  token by token, for chat) and the batched decoding of many prompts.
* ``parallel``: any TP / PP / CP / DP layout, no KV cache (the training layout).
"""

from megasmol.decode.cached import Decoder, generate, greedy_generate
from megasmol.decode.completion import Completion, FinishReason
from megasmol.decode.sampling import SamplingParams, choose

__all__ = ["Completion", "Decoder", "FinishReason", "SamplingParams", "choose", "generate",
           "greedy_generate"]
