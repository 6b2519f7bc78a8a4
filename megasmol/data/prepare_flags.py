"""The flags the chat-template prepare commands share (prepare-chat, prepare-preferences,
prepare-prompts): where the records come from, how they are rendered, how the output is written.

Each command keeps its own help for what differs (the record layout, the files it writes); what is
the same is said once here, so the three commands cannot drift apart.
"""

from __future__ import annotations

import argparse

from megasmol.utils.argtypes import input_path


def add_source_flags(p: argparse.ArgumentParser, *, records: str, writes: str) -> None:
    """``--input`` (``records``: what each record holds) and ``--out`` (``writes``: the files)."""
    p.add_argument("--input", required=True, nargs="+", type=input_path("input", patterns=True),
                   help=f"JSONL / Parquet files, directories or globs{records}; a datasets "
                        "save_to_disk directory; or hf:DATASET_ID where a hub is reachable")
    p.add_argument("--out", required=True, help=f"output prefix: {writes} (its folder is created)")


def add_template_flags(p: argparse.ArgumentParser, *, note: str = "") -> None:
    """``--template`` (``note``: what the command does without one) and ``--tokenizer``."""
    p.add_argument("--template", default="smollm3",
                   help="smollm3 (default), chatml, a .jinja file, or tokenizer (its own "
                        f"chat_template){note}")
    p.add_argument("--tokenizer", help="tokenizer directory (default: Llama-3.2, SmolLM3's)")


def add_output_flags(p: argparse.ArgumentParser) -> None:
    """``--split``, ``--overwrite`` and ``--quiet``."""
    p.add_argument("--split", default="train", help="split of a datasets input (default train)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
