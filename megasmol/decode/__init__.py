"""Decoding: the one decoder that chat, evaluation and RL share.

* ``sampling``: ``SamplingParams`` (greedy, temperature, top_k, top_p) and ``choose`` (tokens
  and their log-probabilities, one ``torch.Generator`` per row).
* ``cached``: one process, the whole model, Megatron-Core's KV cache: ``Decoder`` (one sequence,
  token by token, for chat) and the batched decoding of many prompts.
* ``parallel``: any TP / PP / CP / DP layout, no KV cache (the training layout).
"""
