"""What every formulation implements (``Formulation``), what it returns (``Scored``) and what the
runner hands it for one example (``Answer``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from megasmol.config.typed import ConfigError
from megasmol.eval.tasks.example import Example

if TYPE_CHECKING:
    from megasmol.eval.scoring.requests import Generation

DEFAULT_METRICS = ["acc", "acc_norm"]
"""``TaskSpec.metrics``' default: what a formulation that reports its own metrics accepts."""
CF_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_per_token", "acc_mutual_info", "acc_per_char")
"""The accuracies a task's ``metrics`` may name (cf and requests)."""


@dataclass
class Scored:
    """One example after scoring: what the model saw and what it preferred."""

    index: int
    prompt: str
    continuations: list[str]
    loglikelihoods: list[float]
    gold: int
    prediction: int
    prediction_norm: int
    metrics: dict = field(default_factory=dict)
    extracted: Optional[str] = None
    """fg: the answer found in the generation (``continuations[0]``); code: the execution's result
    (``passed``, ``timed out``, ``failed: ...``)."""
    unconditional: Optional[list[float]] = None
    """cf with ``acc_mutual_info``: each continuation's log-likelihood after the prefix token alone."""
    truncated: Optional[bool] = None
    """Generative tasks: the generation reached ``max_gen_tokens`` with no stop string or EOS."""


@dataclass
class Answer:
    """What the model answered for one example: the log-likelihoods of its pairs (in ``build``'s
    order) and each continuation's token count; for generative formulations the generation, its
    text cut at the first stop string, and what running it returned (``code``)."""

    loglikelihoods: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    generation: Optional[Generation] = None
    completion: Optional[str] = None
    outcome: object = None


class Formulation:
    """One way of asking a task's questions. A subclass sets the class attributes, implements
    ``build`` and ``judge`` (and ``aggregate`` when its metrics are not means), and is listed in
    ``registry.FORMULATIONS`` under the name task YAMLs give it."""

    name: str = ""
    generative: bool = False
    """The answer is a greedy generation after ``build``'s prompt (the runner asks the scorer for
    one); the example's one "choice" is the reference answer the YAML's ``answer`` renders."""
    needs_entry_point: bool = False
    """The YAML must give ``entry_point`` (code)."""
    runs_programs: bool = False
    """``execute`` runs each completion (the runner shows a progress phase for it)."""
    uses_shots: bool = True
    """False: scored from the prompt alone, or with shots already in the data (no few-shot split)."""
    has_chance: bool = True
    """Accuracy by guessing is 1 / number of choices (False for bits per byte and generations)."""
    extracted_key: str = "extracted"
    """samples.jsonl's name for ``Scored.extracted``."""

    def validate_metrics(self, spec) -> None:
        """Refuse ``metrics`` this formulation does not report (``ConfigError`` naming the field)."""
        unknown = sorted(set(spec.metrics) - set(CF_METRICS))
        if unknown or not spec.metrics:
            raise ConfigError(f"task {spec.name}: metrics {unknown or '[]'}: choose from "
                              f"{', '.join(CF_METRICS)}")
        if spec.metrics != DEFAULT_METRICS:
            raise ConfigError(f"task {spec.name}: metrics is for formulation cf; "
                              f"{spec.formulation} reports its own")

    def primary(self, spec) -> str:
        """The metric a suite averages when the task names none."""
        return "acc"

    def prompt_and_continuations(self, example: Example, delimiter: str,
                                 shots: list[Example]) -> tuple[str, list[str]]:
        """The full prompt (few-shot examples first) and the continuations scored (none for
        generative formulations)."""
        raise NotImplementedError

    def completion(self, text: str, spec) -> str:
        """``generative``: the generation as judged (cut at the first of the task's stop strings)."""
        raise NotImplementedError

    def build(self, example: Example, spec, shots: list[Example]) -> tuple[str, list[tuple[str, str]],
                                                                           list[str]]:
        """(the prompt, the (context, continuation) pairs to score, what each pair adds to the
        prompt, for samples.jsonl); generative formulations score no pairs."""
        raise NotImplementedError

    def execute(self, task, built: list, completions: list[str], progress=None) -> Optional[list]:
        """``runs_programs``: each completion's outcome; None for the others."""
        return None

    def judge(self, index: int, example: Example, prompt: str, shown: list[str], answer: Answer,
              spec) -> Scored:
        raise NotImplementedError

    def aggregate(self, scored: list[Scored]) -> dict[str, tuple[float, float]]:
        """metric -> (value, standard error): the mean over examples of each metric, its standard
        error the sample standard deviation over sqrt(n), as lm-eval reports it."""
        out = {}
        for name in scored[0].metrics:
            values = [s.metrics[name] for s in scored]
            out[name] = (sum(values) / len(values), stderr(values))
        return out


def stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)

