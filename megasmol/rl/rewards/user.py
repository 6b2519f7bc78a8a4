"""A user's reward, ``module:function``: called as ``function(completions=[str],
records=[PromptRecord], **kwargs)`` and returning one real number per completion. A function
that raises, or returns a value that is not a finite number (None, NaN, a string) or the wrong
count, is one :class:`RewardError` naming it and the sample: never a silent NaN in the loss."""

from __future__ import annotations

import math
import numbers

from megasmol.config.rewards import load_function
from megasmol.rl.rewards.base import Reward, RewardError


class UserReward(Reward):
    def __init__(self, spec):
        super().__init__(spec)
        self.function = load_function(spec.name, f"reward {self.name}")
        self.kwargs = dict(spec.options()["kwargs"] or {})

    def score(self, completions, records):
        try:
            values = self.function(completions=completions, records=records, **self.kwargs)
        except Exception as exc:  # noqa: BLE001 - the user's function, named in one line
            raise RewardError(f"reward {self.name} ({self.spec.name}) raised {type(exc).__name__}: "
                              f"{exc}") from exc
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward {self.name} ({self.spec.name}) returned a "
                              f"{type(values).__name__}, not a list of numbers") from None
        if len(values) != len(completions):
            raise RewardError(f"reward {self.name} ({self.spec.name}) returned {len(values)} value(s) "
                              f"for {len(completions)} completion(s)")
        out = []
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(f"reward {self.name} ({self.spec.name}) returned {value!r} for sample "
                                  f"{index} (from {records[index].where or '?'}); expected a finite number")
            out.append(float(value))
        return out
