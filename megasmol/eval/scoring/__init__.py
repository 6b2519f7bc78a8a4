"""What a model answers: token and generation requests, log-likelihoods through the output layer
(``log_probs``) with shared contexts scored once (``shared_context``), from one process
(``scorers``) or from a Megatron-Core model in any parallel layout (``parallel_scorer``); both
generate with the decode room (``megasmol.decode``). Every scorer implements ``eval.api.Scorer``."""
