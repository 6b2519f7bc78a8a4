"""What every reward is: a named function of the completions and their prompt records that gives
one float per completion (None where it does not apply to that prompt: a math reward on a code
prompt), and the one error a reward that misbehaves turns into."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from megasmol.errors import UserError

if TYPE_CHECKING:
    from megasmol.config.rewards import RewardSpec
    from megasmol.data.prompts.store import PromptRecord


class RewardError(UserError):
    """A reward that raised, or gave NaN, None or the wrong number of values: one line naming the
    reward and the sample."""


class Reward:
    """One reward function; ``name`` is its metric name (``rewards/NAME/mean``)."""

    name: str = ""

    def __init__(self, spec: RewardSpec):
        self.spec = spec
        self.name = spec.metric_name

    def score(self, completions: list[str], records: list[PromptRecord]) -> list[Optional[float]]:
        """One value per completion; None where the reward does not apply to the prompt."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        """What the last ``score`` has to say on the console (e.g. programs not run in time)."""
        return []

    def close(self) -> None:
        """Release worker processes, if any."""
