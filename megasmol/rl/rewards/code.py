"""``code``: the prompt's tests run against the completion's program in evaluation's confined
sandbox (:mod:`megasmol.eval.sandbox`: two confined processes per program, the verdict from the
tests' own process), ``workers`` programs at a time, within ``batch_budget_s`` for the batch.

The program is HumanEval's for a plain-string prompt (the prompt and the completion, which
continues it; the prompt runs again before the tests, for its helpers), and for a chat prompt the
completion's last fenced code block (or the whole completion when it has none). A timeout, a
crash, an escape attempt, a program not started within the budget: 0, never an exception. The
sandbox is checked once when the reward is built: on a kernel that cannot confine programs it is
refused, unless ``MEGASMOL_SANDBOX=limits-only`` accepts resource limits only (as evaluation
does).
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from megasmol.eval.sandbox import CodeTest, Limits, run_test
from megasmol.rl.rewards.base import Reward

_FENCED = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.S)
_PROBE = CodeTest("def probe():\n    return 1\n", "assert probe() == 1\n", "probe")


def program(completion: str, record) -> CodeTest:
    """What runs for one completion of ``record``."""
    if record.chat:
        blocks = _FENCED.findall(completion)
        return CodeTest(blocks[-1] if blocks else completion, record.tests, record.entry_point)
    return CodeTest(record.text + completion, record.tests, record.entry_point, setup=record.text)


class CodeReward(Reward):
    """1.0 when the prompt's tests pass, else 0.0; None on prompts without tests."""

    def __init__(self, spec):
        super().__init__(spec)
        options = spec.options()
        self.limits = Limits(timeout_s=options["timeout_s"], memory_mb=options["memory_mb"])
        self.workers, self.budget_s = options["workers"], options["batch_budget_s"]
        self._skipped = 0
        run_test(_PROBE, self.limits)  # ConfigError on a kernel without the sandbox

    def score(self, completions, records):
        deadline = time.monotonic() + self.budget_s

        def one(item) -> tuple[Optional[float], bool]:
            """(value, skipped for want of time)."""
            completion, record = item
            if record.tests is None:
                return None, False
            if time.monotonic() > deadline:
                return 0.0, True
            try:
                return float(run_test(program(completion, record), self.limits).passed), False
            except OSError:  # the machine, not the program (descriptors, disk): scored 0
                return 0.0, False

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            results = list(pool.map(one, zip(completions, records)))
        self._skipped = sum(skipped for _, skipped in results)
        return [value for value, _ in results]

    def notes(self) -> list[str]:
        if not self._skipped:
            return []
        return [f"reward {self.name}: {self._skipped} program(s) not run within batch_budget_s "
                f"{self.budget_s:g} s: scored 0 (raise it, or workers)"]
