"""Small indexed datasets written with Megatron-Core's own builder, for data-path tests."""

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

EOS = 2


def write_dataset(prefix, documents, dtype=np.int32):
    """``documents``: lists of token ids (EOS is appended to each)."""
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for doc in documents:
        ids = list(doc) + [EOS]
        builder.add_document(torch.tensor(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def recipe_at(root, stages):
    """A DataRecipe over datasets under ``root``, built the way ``load_recipe`` builds one."""
    from megasmol.config.typed import from_dict
    from megasmol.data.recipe import DataRecipe

    recipe = from_dict(DataRecipe, {"name": "t", "root": str(root), "stages": stages})
    recipe.base_dir = str(root)
    return recipe


def random_documents(count, low, high, min_len, max_len, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(low, high, rng.integers(min_len, max_len)).tolist() for _ in range(count)]
