"""How an example becomes log-likelihood requests, and how their results become metrics.

* ``cf`` (cloze): the choices are not shown; each choice is scored after the context. ``acc`` is
  the argmax of the summed log-likelihood, ``acc_norm`` the argmax of the log-likelihood divided
  by the choice's length in characters: lm-evaluation-harness's definitions (the playbook's
  character normalization is the same thing under lm-eval's name). A task may ask for more
  (``metrics`` in its YAML): ``acc_bytes`` (divided by UTF-8 bytes, lm-eval's), ``acc_per_token``
  (divided by the continuation's tokens, OLMES's per-token normalization) and ``acc_mutual_info``
  (PMI: minus the choice's unconditional log-likelihood, scored after the prefix token alone,
  as lm-eval's ``acc_mutual_info``; one more request per choice).
* ``mcf`` (multiple choice): the choices are listed with letters after the question and the
  answer letter (`` A``, `` B``, ...) is scored; ``acc``.
* every choice-scoring formulation also reports ``gold_loglik``, the mean log-likelihood of the
  right answer (not an lm-eval metric: smoother than accuracy, it moves before accuracy does).
* ``partial`` (WinoGrande's partial evaluation, lm-eval's multiple-input tasks): each choice is
  a different context (the sentence up to the blank, with that option filled in) and the same
  continuation (the rest of the sentence) is scored after each; ``acc``. Few-shot examples are
  written with their right option filled in.
* ``fg`` (free generation): greedy decoding with the KV cache until a stop string, the answer
  extracted with the task's regular expression (the last match, as lm-eval's GSM8K
  "flexible-extract") and compared after dropping ``$``, thousands commas and a final period;
  ``exact_match``.
* ``requests``: ready (context, continuation) pairs from an OLMES request file (its 5-shot
  prompts built by OLMES); cf's metrics over them. ``acc_per_char`` divides by the continuation's
  characters, its leading space included, which is olmo_eval's ``len_norm`` (OLMES's
  ``acc_per_char``); ``acc`` is OLMES's ``acc_raw``.
* ``bpb``: bits per byte of the gold continuation (corpus level: total nats over total UTF-8
  bytes, divided by ln 2), lower is better; for generative tasks at small scale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

from megasmol.eval.tasks import Example

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
GENERATIVE = ("fg", "code")
"""Formulations whose answer is a greedy generation."""


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


def _mcf_context(example: Example) -> str:
    listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(example.choices))
    return f"{example.context}\n{listed}\nAnswer:"


def prompt_and_continuations(example: Example, formulation: str, delimiter: str,
                             shots: list[Example]) -> tuple[str, list[str]]:
    """The full prompt (few-shot examples first) and the continuations to score."""
    if formulation == "code":  # the prompt is the function's head; no shots
        return example.context, []
    if formulation == "fg":
        prefix = "".join(f"{s.context}{delimiter}{s.choices[0]}\n\n" for s in shots)
        return prefix + example.context, []
    if formulation == "mcf":
        prefix = "".join(f"{_mcf_context(s)} {LETTERS[s.gold]}\n\n" for s in shots)
        return prefix + _mcf_context(example), [f" {LETTERS[i]}" for i in range(len(example.choices))]
    prefix = "".join(f"{s.context}{delimiter}{s.choices[s.gold]}\n\n" for s in shots)
    if formulation == "bpb":
        return prefix + example.context, [delimiter + example.choices[example.gold]]
    return prefix + example.context, [delimiter + c for c in example.choices]


def scoring_pairs(example: Example, formulation: str, delimiter: str, shots: list[Example],
                  unconditional: bool = False) -> tuple[str, list[tuple[str, str]], list[str]]:
    """(the prompt shown in samples.jsonl, the (context, continuation) pairs to score, what each
    pair adds to the prompt, for samples.jsonl). ``unconditional`` (cf's ``acc_mutual_info``):
    each continuation is also scored after an empty context, after the conditional pairs."""
    if formulation == "requests":  # OLMES: the pairs as its request file has them, shots included
        pairs = list(zip(example.record["contexts"], example.choices))
        return pairs[0][0], pairs, list(example.choices)
    if formulation == "partial":
        prefix = "".join(f"{s.choices[s.gold]}{delimiter}{s.context}\n\n" for s in shots)
        pairs = [(prefix + choice, delimiter + example.context) for choice in example.choices]
        return prefix, pairs, [choice + delimiter + example.context for choice in example.choices]
    prompt, continuations = prompt_and_continuations(example, formulation, delimiter, shots)
    pairs = [(prompt, c) for c in continuations]
    if unconditional:
        pairs += [("", c) for c in continuations]
    return prompt, pairs, continuations


def extract_answer(generation: str, pattern: str) -> str:
    """The last match of ``pattern`` in ``generation`` (its first non-empty group), or ""."""
    found = ""
    for match in re.finditer(pattern, generation):
        groups = [g for g in match.groups() if g] if match.groups() else [match.group(0)]
        found = groups[0] if groups else match.group(0)
    return found


def normalize_answer(text: str) -> str:
    """Exact match compares numbers as written, without $, thousands commas or a final period."""
    text = text.strip().replace(",", "").replace("$", "")
    return text[:-1] if text.endswith(".") else text


def cut_at_stop(generation: str, until: list[str]) -> str:
    cut = min((generation.find(stop) for stop in until if stop in generation), default=-1)
    return generation if cut < 0 else generation[:cut]


def judge_generation(index: int, example: Example, prompt: str, generation: str,
                     pattern: str) -> Scored:
    extracted = extract_answer(generation, pattern)
    hit = normalize_answer(extracted) == normalize_answer(example.choices[0])
    return Scored(index, prompt, [generation], [], 0, 0 if hit else -1, 0 if hit else -1,
                  {"exact_match": float(hit)}, extracted)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, as numpy


CF_METRICS = ("acc", "acc_norm", "acc_bytes", "acc_per_token", "acc_mutual_info", "acc_per_char")


def _cf_scores(metric: str, example: Example, lls: list[float], tokens: list[int],
               unconditional: list[float]) -> list[float]:
    if metric in ("acc_norm", "acc_per_char"):  # the same division: OLMES's name for its choices
        return [ll / max(len(c), 1) for ll, c in zip(lls, example.choices)]
    if metric == "acc_bytes":
        return [ll / max(len(c.encode("utf-8")), 1) for ll, c in zip(lls, example.choices)]
    if metric == "acc_per_token":
        return [ll / max(n, 1) for ll, n in zip(lls, tokens)]
    if metric == "acc_mutual_info":
        return [ll - u for ll, u in zip(lls, unconditional)]
    return lls


def judge(index: int, example: Example, formulation: str, prompt: str, continuations: list[str],
          lls: list[float], tokens: list[int] | None = None,
          cf_metrics: tuple[str, ...] = ("acc", "acc_norm")) -> Scored:
    """``lls`` (and ``tokens``, each continuation's token count) in ``scoring_pairs``' order."""
    if formulation == "bpb":
        nbytes = len(continuations[0].encode("utf-8"))
        return Scored(index, prompt, continuations, lls, example.gold, example.gold, example.gold,
                      {"nats": -lls[0], "bytes": nbytes})
    unconditional = lls[len(continuations):]
    lls = lls[:len(continuations)]
    prediction = _argmax(lls)
    prediction_norm = prediction
    metrics = {"acc": float(prediction == example.gold)}
    if formulation in ("cf", "requests"):  # (partial: the continuation is the same for every choice)
        for metric in cf_metrics:
            choice = _argmax(_cf_scores(metric, example, lls, tokens or [], unconditional))
            metrics[metric] = float(choice == example.gold)
            if metric == "acc_norm":
                prediction_norm = choice
    # The right answer's log-likelihood: smoother than accuracy, so it moves early in training.
    metrics["gold_loglik"] = lls[example.gold]
    return Scored(index, prompt, continuations, lls, example.gold, prediction, prediction_norm, metrics,
                  unconditional=unconditional or None)


def aggregate(scored: list[Scored], formulation: str) -> dict[str, tuple[float, float]]:
    """metric -> (value, standard error); the standard error of a mean is the sample standard
    deviation over sqrt(n), as lm-eval reports it."""
    if formulation == "bpb":
        nats = sum(s.metrics["nats"] for s in scored)
        nbytes = sum(s.metrics["bytes"] for s in scored)
        per_example = [s.metrics["nats"] / max(s.metrics["bytes"], 1) / math.log(2) for s in scored]
        return {"bpb": (nats / max(nbytes, 1) / math.log(2), _stderr(per_example))}
    out = {}
    for name in scored[0].metrics:
        values = [s.metrics[name] for s in scored]
        out[name] = (sum(values) / len(values), _stderr(values))
    return out


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
