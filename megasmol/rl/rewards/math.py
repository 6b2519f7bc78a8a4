"""``math``: the completion's final answer against the prompt's reference.

* ``flexible`` (default): the last ``\\boxed{...}`` answer when the completion has one, else
  lm-eval's GSM8K ``flexible-extract`` (the last number);
* ``strict``: lm-eval's GSM8K ``strict-match`` (the first ``#### N``);
* ``verify``: the optional ``math-verify`` package (symbolic equivalence), run in worker
  processes because it times itself out with ``signal.alarm`` (:mod:`.verify`).

The extraction and the comparison are evaluation's own implementation of lm-eval's filters
(:func:`~megasmol.eval.formulations.generation.extract_answer`, ``normalize_answer``), with the
GSM8K task definition's options (``answer_ignore``: commas, ``$``, a final period; case
ignored), so a completion the reward scores 1 is one evaluation counts as an exact match.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

from megasmol.eval.formulations.generation import extract_answer, normalize_answer
from megasmol.rl.rewards.base import Reward

STRICT_PATTERN = r"#### (\-?[0-9\.\,]+)"
"""lm-eval's gsm8k ``strict-match`` regex (``group_select`` 0: the first match)."""
BOXED = "\\boxed{"


@lru_cache(maxsize=1)
def gsm8k_options() -> tuple[str, tuple[str, ...], bool]:
    """(flexible-extract pattern, regexes removed before comparing, ignore case) of the GSM8K
    task definition evaluation scores with."""
    from megasmol.config.typed import from_dict, load_yaml
    from megasmol.eval.tasks.registry import TASK_DIR
    from megasmol.eval.tasks.spec import TaskSpec

    spec = from_dict(TaskSpec, load_yaml(TASK_DIR / "gsm8k.yaml"))
    return spec.answer_pattern, tuple(spec.answer_ignore), spec.ignore_case


def last_boxed(text: str) -> Optional[str]:
    """The contents of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind(BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(BOXED)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index]
    return None


def extracted(completion: str, mode: str) -> str:
    """What the reward compares with the reference ("" when nothing is found)."""
    pattern, _, _ = gsm8k_options()
    if mode == "strict":
        return extract_answer(completion, STRICT_PATTERN, select=0)
    boxed = last_boxed(completion)
    return boxed if boxed is not None else extract_answer(completion, pattern)


def matches(completion: str, reference: str, mode: str) -> bool:
    _, ignore, ignore_case = gsm8k_options()
    found = extracted(completion, mode)
    return bool(found) and normalize_answer(found, ignore, ignore_case) == normalize_answer(
        reference, ignore, ignore_case)


class MathReward(Reward):
    """1.0 when the completion's answer is the reference, else 0.0; None on prompts without one."""

    def __init__(self, spec):
        super().__init__(spec)
        options = spec.options()
        self.mode = options["mode"]
        self._verifier = None
        if self.mode == "verify":
            from megasmol.rl.rewards.verify import Verifier

            self._verifier = Verifier(options["workers"])

    def score(self, completions, records):
        if self._verifier is not None:
            return self._verifier.score(completions, [r.answer for r in records])
        return [None if r.answer is None else float(matches(c, r.answer, self.mode))
                for c, r in zip(completions, records)]

    def close(self) -> None:
        if self._verifier is not None:
            self._verifier.close()
