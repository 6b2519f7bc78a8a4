"""A run's objective: what each micro-batch's output becomes (:mod:`base` declares the protocol;
:mod:`registry` maps ``training.objective`` to :mod:`next_token` or :mod:`preference`)."""

from megasmol.train.objectives.base import LossReport, Objective, ObjectiveKind
from megasmol.train.objectives.next_token import TokenLoss
from megasmol.train.objectives.preference import PreferenceLoss
from megasmol.train.objectives.registry import OBJECTIVES, objective_kind
from megasmol.train.objectives.segments import document_logps

__all__ = ["LossReport", "OBJECTIVES", "Objective", "ObjectiveKind", "PreferenceLoss", "TokenLoss",
           "document_logps", "objective_kind"]
