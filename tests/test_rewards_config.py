"""The ``rewards:`` config: a typed list of reward specs (the typed loader reads lists of
dataclasses and names the item in its errors), options checked per reward, the overlong penalty
per reasoning mode, user functions imported when the config is read."""

import pytest

from megasmol.config.rewards import OverlongLimits, RewardsConfig, RewardSpec
from megasmol.config.typed import ConfigError, from_dict


def _load(data):
    return from_dict(RewardsConfig, data, "rewards")


def test_a_list_of_reward_specs_with_defaults_and_per_mode_lengths():
    config = _load({"functions": [{"name": "math", "mode": "strict", "weight": 2},
                                  {"name": "format", "think": "forbidden", "weight": 0.5},
                                  {"name": "code", "timeout_s": 1}],
                    "overlong": {"l_max": 3000, "l_cache": 500, "no_think": {"l_max": 2560, "l_cache": 512}},
                    "mask_truncated_completions": True})
    assert all(isinstance(s, RewardSpec) for s in config.functions)
    assert [s.weight for s in config.functions] == [2.0, 0.5, 1.0]
    assert config.functions[0].options() == {"mode": "strict", "workers": 2}
    assert config.functions[2].options() == {"timeout_s": 1.0, "memory_mb": 1024, "workers": 2,
                                             "batch_budget_s": 120.0}
    assert config.overlong.limits("no_think") == OverlongLimits(2560, 512)
    assert config.overlong.limits("think") == config.overlong.limits(None) == OverlongLimits(3000, 500)
    assert _load({}).functions == [RewardSpec("math")] and not _load({}).overlong.enabled
    user = _load({"functions": [{"name": "json:dumps", "kwargs": {"indent": 1}}]}).functions[0]
    assert (user.metric_name, user.options()) == ("dumps", {"kwargs": {"indent": 1}})


@pytest.mark.parametrize("data, message", [
    ({"functions": [{"name": "math", "bogus": 1}]}, r"unknown field\(s\) rewards\.functions\[0\]\.bogus"),
    ({"functions": [{"name": "math"}, {"name": "math", "mode": "fuzzy"}]},
     r"rewards\.functions\[1\]\.mode: 'fuzzy' is not one of"),
    ({"functions": [{"name": "format", "mode": "strict"}]},
     r"rewards\.functions\[0\]\.mode: not an option of the format reward \(its options: think\)"),
    ({"functions": [{"name": "math"}, {"name": "math"}]},
     r"rewards\.functions\[1\]: a second reward named 'math' \(as functions\[0\]\); give one a label"),
    ({"functions": [{"name": "Math"}]},
     r"rewards\.functions\[0\]\.name: 'Math' is none of math, code, format"),
    ({"functions": []}, r"rewards\.functions: give at least one reward"),
    ({"functions": [{"name": "code", "workers": 0}]}, r"rewards\.functions\[0\]\.workers must be >= 1"),
    ({"overlong": {"l_max": 100, "l_cache": 200}}, r"rewards\.overlong\.l_cache must be between 0 and l_max"),
    ({"overlong": {"think": {"l_max": 0, "l_cache": 0}}}, r"rewards\.overlong\.think\.l_max must be >= 1"),
    ({"overlong": {"l_cache": 5}}, r"rewards\.overlong\.l_cache is set without rewards\.overlong\.l_max"),
    ({"functions": [{"name": "no_such_module_xyz:score"}]},
     r"rewards\.functions\[0\]\.name: no_such_module_xyz:score: cannot import no_such_module_xyz "
     r"\(ModuleNotFoundError"),
    ({"functions": [{"name": "json:no_such_function"}]},
     r"rewards\.functions\[0\]\.name: json:no_such_function: json has no function no_such_function"),
])
def test_bad_reward_configs_are_one_line_naming_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        _load(data)


def test_verify_mode_is_refused_in_one_line_without_math_verify():
    try:
        import math_verify  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"^rewards\.functions\[0\]\.mode: verify needs the "
                                              r"math-verify package, which is not installed"):
            _load({"functions": [{"name": "math", "mode": "verify"}]})
    else:
        assert _load({"functions": [{"name": "math", "mode": "verify"}]}).functions[0].mode == "verify"
