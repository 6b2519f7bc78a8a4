"""RL prompts with verifiable answers: ``prepare-prompts`` (:mod:`prepare`), the on-disk set and
its reader (:mod:`store`)."""

from megasmol.data.prompts.store import PromptRecord, PromptSet, is_prompt_set, read_prompts

__all__ = ["PromptRecord", "PromptSet", "is_prompt_set", "read_prompts"]
