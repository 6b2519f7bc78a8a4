"""Planning a run before renting a cluster: compute and GPUs, hyper-parameters, tokenizer fertility,
parallel layouts that fit."""
