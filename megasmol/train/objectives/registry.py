"""The objectives a run can train, by their ``training.objective`` name: adding one is a module
with an :class:`~megasmol.train.objectives.base.ObjectiveKind` and an entry here (and its name in
the config field's choices)."""

from __future__ import annotations

from megasmol.train.objectives.base import ObjectiveKind
from megasmol.train.objectives.next_token import NextToken
from megasmol.train.objectives.preference import Preference
from megasmol.train.objectives.rl import ReinforcementLearning

OBJECTIVES: dict[str, ObjectiveKind] = {kind.name: kind for kind in
                                        (NextToken(), Preference(), ReinforcementLearning())}


def objective_kind(name: str) -> ObjectiveKind:
    return OBJECTIVES[name]  # the config's Literal admits only registered names
