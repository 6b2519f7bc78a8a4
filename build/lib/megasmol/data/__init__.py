"""The data path: tokenize to Megatron indexed datasets, stage recipes, loaders, masks, audit."""
