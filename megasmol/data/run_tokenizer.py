"""The tokenizer a run uses: ``data.tokenizer`` resolved (the config only names it)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasmol.tokenizer import default_tokenizer_dir

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig


def run_tokenizer_dir(config: RunConfig) -> Optional[Path]:
    """The tokenizer ``data.tokenizer`` names for a run: a directory, the bundled one, or for
    ``auto`` the one ``prepare-chat`` (or ``prepare-preferences``, ``prepare-prompts``) stored
    with the recipe's data (else the bundled)."""
    tokenizer = config.data.tokenizer
    if tokenizer is None:
        return None
    if tokenizer == "auto":
        from megasmol.data.masked.dataset import chat_tokenizer_dir
        from megasmol.data.prompts.store import is_prompt_set, read_prompts
        from megasmol.data.recipe import load_recipe

        recipe = load_recipe(config.recipe_reference())
        root = config.data.root and str(config.path(config.data.root))
        prefixes = [str(recipe.dataset_prefix(e, root)) for stage in recipe.stages for e in stage.datasets]
        prompts = [read_prompts(p).tokenizer_dir for p in prefixes if is_prompt_set(p)]
        found = prompts[0] if prompts else chat_tokenizer_dir(prefixes)
        if found is not None:
            return found
    if tokenizer in ("bundled", "auto"):
        return default_tokenizer_dir()
    return config.path(tokenizer)
