"""argparse types: numbers refused at parse time, with the option named by argparse (``argument
--steps: must be 10 or more, got 5``) instead of a traceback later; and input paths, marked on the
argument that takes them and checked right after parsing."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def at_least(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


positive_int = at_least(1)


def positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be above 0, got {raw}")
    if value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {raw}")
    return value


positive_float.__name__ = "number > 0"


class InputPath(str):
    """The value of an argument that names an existing input (``type=input_path("--config")``).
    ``megasmol``'s entry point checks every such value right after parsing, before a command
    imports torch, Megatron-Core or transformers, so a mistyped path is one line at once."""

    flag: str = ""
    """How the error names the argument (``--config``, ``RUN_DIR``)."""
    patterns: bool = False
    """Data inputs: a glob or an ``hf:ID`` is not a path to check."""

    def missing(self) -> bool:
        if self.patterns and (self.startswith("hf:") or any(c in self for c in "*?[")):
            return False
        return not Path(self).expanduser().exists()


def input_path(flag: str, patterns: bool = False) -> Callable[[str], InputPath]:
    def parse(raw: str) -> InputPath:
        value = InputPath(raw)
        value.flag, value.patterns = flag, patterns
        return value

    parse.__name__ = "path"
    return parse


def add_model_choice(parser: argparse.ArgumentParser,
                     checkpoint_help: str = "megasmol checkpoint: root, iteration or run directory "
                                            "(Megatron-Core model)",
                     hf_help: str = "Hugging Face model directory (transformers)") -> None:
    """The one-of ``--checkpoint CHECKPOINT | --hf HF`` that the commands reading a model share."""
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", type=input_path("--checkpoint"), help=checkpoint_help)
    model.add_argument("--hf", type=input_path("--hf"), help=hf_help)
