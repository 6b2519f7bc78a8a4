"""The formulations that score choices by their log-likelihood (and bits per byte).

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
* ``requests``: ready (context, continuation) pairs from an OLMES request file (its 5-shot
  prompts built by OLMES); cf's metrics over them. ``acc_per_char`` divides by the continuation's
  characters, its leading space included, which is olmo_eval's ``len_norm`` (OLMES's
  ``acc_per_char``); ``acc`` is OLMES's ``acc_raw``.
* ``bpb``: bits per byte of the gold continuation (corpus level: total nats over total UTF-8
  bytes, divided by ln 2), lower is better; for generative tasks at small scale.
"""

from __future__ import annotations

import math

from megasmol.config.typed import ConfigError
from megasmol.eval.formulations.base import CF_METRICS, Answer, Formulation, Scored, stderr
from megasmol.eval.tasks.example import Example

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first index on ties, as numpy


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


class Choice(Formulation):
    """Each choice's log-likelihood after the context; ``acc`` is the argmax, and ``gold_loglik``
    the right answer's log-likelihood (smoother than accuracy: it moves early in training)."""

    takes_metrics = False
    """The task's ``metrics`` choose the accuracies reported (cf, requests)."""

    def validate_metrics(self, spec) -> None:
        if not self.takes_metrics:
            return super().validate_metrics(spec)
        unknown = sorted(set(spec.metrics) - set(CF_METRICS))
        if unknown or not spec.metrics:
            raise ConfigError(f"task {spec.name}: metrics {unknown or '[]'}: choose from "
                              f"{', '.join(CF_METRICS)}")

    def prompt_and_continuations(self, example: Example, delimiter: str,
                                 shots: list[Example]) -> tuple[str, list[str]]:
        """The full prompt (few-shot examples first) and the continuations to score."""
        prefix = "".join(f"{s.context}{delimiter}{s.choices[s.gold]}\n\n" for s in shots)
        return prefix + example.context, [delimiter + c for c in example.choices]

    def pairs(self, example: Example, delimiter: str, shots: list[Example],
              unconditional: bool = False) -> tuple[str, list[tuple[str, str]], list[str]]:
        """(the prompt shown in samples.jsonl, the (context, continuation) pairs to score, what each
        pair adds to the prompt, for samples.jsonl). ``unconditional`` (cf's ``acc_mutual_info``):
        each continuation is also scored after an empty context, after the conditional pairs."""
        prompt, continuations = self.prompt_and_continuations(example, delimiter, shots)
        pairs = [(prompt, c) for c in continuations]
        if unconditional:
            pairs += [("", c) for c in continuations]
        return prompt, pairs, continuations

    def build(self, example, spec, shots):
        return self.pairs(example, spec.target_delimiter, shots,
                          unconditional="acc_mutual_info" in spec.metrics)

    def judge(self, index: int, example: Example, prompt: str, shown: list[str], answer: Answer,
              spec) -> Scored:
        """``answer.loglikelihoods`` (and ``tokens``, each continuation's token count) in
        ``pairs``' order."""
        lls, tokens = answer.loglikelihoods, answer.tokens
        unconditional = lls[len(shown):]
        lls = lls[:len(shown)]
        prediction = _argmax(lls)
        prediction_norm = prediction
        metrics = {"acc": float(prediction == example.gold)}
        if self.takes_metrics:  # (partial: the continuation is the same for every choice)
            for metric in spec.metrics:
                choice = _argmax(_cf_scores(metric, example, lls, tokens, unconditional))
                metrics[metric] = float(choice == example.gold)
                if metric == "acc_norm":
                    prediction_norm = choice
        # The right answer's log-likelihood: smoother than accuracy, so it moves early in training.
        metrics["gold_loglik"] = lls[example.gold]
        return Scored(index, prompt, shown, lls, example.gold, prediction, prediction_norm, metrics,
                      unconditional=unconditional or None)


class Cloze(Choice):
    name = "cf"
    takes_metrics = True

    def primary(self, spec) -> str:
        return "acc_norm" if "acc_norm" in spec.metrics else "acc"


class MultipleChoice(Choice):
    name = "mcf"

    @staticmethod
    def listed(example: Example) -> str:
        listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(example.choices))
        return f"{example.context}\n{listed}\nAnswer:"

    def prompt_and_continuations(self, example, delimiter, shots):
        prefix = "".join(f"{self.listed(s)} {LETTERS[s.gold]}\n\n" for s in shots)
        return (prefix + self.listed(example),
                [f" {LETTERS[i]}" for i in range(len(example.choices))])


class Partial(Choice):
    name = "partial"

    def pairs(self, example, delimiter, shots, unconditional=False):
        prefix = "".join(f"{s.choices[s.gold]}{delimiter}{s.context}\n\n" for s in shots)
        pairs = [(prefix + choice, delimiter + example.context) for choice in example.choices]
        return prefix, pairs, [choice + delimiter + example.context for choice in example.choices]


class Requests(Choice):
    name = "requests"
    takes_metrics = True
    uses_shots = False  # the request file's contexts hold OLMES's shots

    def pairs(self, example, delimiter, shots, unconditional=False):
        pairs = list(zip(example.record["contexts"], example.choices))
        return pairs[0][0], pairs, list(example.choices)


class BitsPerByte(Choice):
    name = "bpb"
    has_chance = False

    def primary(self, spec) -> str:
        return "bpb"

    def prompt_and_continuations(self, example, delimiter, shots):
        prompt, _ = super().prompt_and_continuations(example, delimiter, shots)
        return prompt, [delimiter + example.choices[example.gold]]

    def judge(self, index, example, prompt, shown, answer, spec):
        nbytes = len(shown[0].encode("utf-8"))
        return Scored(index, prompt, shown, answer.loglikelihoods, example.gold, example.gold,
                      example.gold, {"nats": -answer.loglikelihoods[0], "bytes": nbytes})

    def aggregate(self, scored):
        """Corpus level: total nats over total UTF-8 bytes, divided by ln 2."""
        nats = sum(s.metrics["nats"] for s in scored)
        nbytes = sum(s.metrics["bytes"] for s in scored)
        per_example = [s.metrics["nats"] / max(s.metrics["bytes"], 1) / math.log(2) for s in scored]
        return {"bpb": (nats / max(nbytes, 1) / math.log(2), stderr(per_example))}
