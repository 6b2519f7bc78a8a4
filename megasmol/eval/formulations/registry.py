"""Formulation names (a task YAML's ``formulation:``) -> the objects that implement them. A new
formulation is one class (base.Formulation) and one line here."""

from __future__ import annotations

from megasmol.config.typed import ConfigError
from megasmol.eval.formulations.base import Formulation
from megasmol.eval.formulations.choice import BitsPerByte, Choice, Cloze, MultipleChoice, Partial, Requests
from megasmol.eval.formulations.code import Code
from megasmol.eval.formulations.generation import FreeGeneration
from megasmol.eval.tasks.example import Example

FORMULATIONS: dict[str, Formulation] = {f.name: f for f in (
    Cloze(), MultipleChoice(), BitsPerByte(), FreeGeneration(), Partial(), Code(), Requests())}


def formulation(name: str, where: str = "formulation") -> Formulation:
    """The formulation called ``name``; ``where`` names the task in the error."""
    try:
        return FORMULATIONS[name]
    except KeyError:
        raise ConfigError(f"{where}: formulation {name!r} is not one of {list(FORMULATIONS)}") from None


def validate(spec) -> None:
    """What a task's formulation asks of its other fields (``answer``, ``entry_point``,
    ``metrics``), each refused with the field named."""
    kind = formulation(spec.formulation, f"task {spec.name}")
    if kind.generative != (spec.answer is not None):
        generative = [name for name, f in FORMULATIONS.items() if f.generative]
        raise ConfigError(f"task {spec.name}: answer is for (and required by) formulations "
                          f"{' and '.join(generative)}")
    if kind.needs_entry_point != (spec.entry_point is not None):
        needing = [name for name, f in FORMULATIONS.items() if f.needs_entry_point]
        raise ConfigError(f"task {spec.name}: entry_point is for (and required by) formulation "
                          f"{' and '.join(needing)}")
    kind.validate_metrics(spec)


def prompt_and_continuations(example: Example, name: str, delimiter: str,
                             shots: list[Example]) -> tuple[str, list[str]]:
    """The full prompt (few-shot examples first) and the continuations formulation ``name``
    scores (none for generative ones)."""
    return formulation(name).prompt_and_continuations(example, delimiter, shots)


def scoring_pairs(example: Example, name: str, delimiter: str, shots: list[Example],
                  unconditional: bool = False) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(the prompt shown in samples.jsonl, the (context, continuation) pairs to score, what each
    pair adds to the prompt) under formulation ``name``; see ``choice.Choice.pairs``."""
    kind = formulation(name)
    if not isinstance(kind, Choice):
        raise TypeError(f"formulation {name!r} scores no (context, continuation) pairs")
    return kind.pairs(example, delimiter, shots, unconditional)
