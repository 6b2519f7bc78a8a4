"""Learning-rate schedules: the LR at known steps."""

import math

import pytest

from megasmol.config.typed import ConfigError, from_dict
from megasmol.train.schedules import ScheduleConfig, lr_at


def _config(**fields):
    return from_dict(ScheduleConfig, fields)


def test_smollm3_wsd():
    config = _config(kind="wsd", lr=2e-4, warmup_steps=2000, decay_steps=522_000)
    total = 4_720_000
    assert lr_at(config, 1, total) == pytest.approx(2e-4 / 2000)
    assert lr_at(config, 1000, total) == pytest.approx(1e-4)
    assert lr_at(config, 2000, total) == 2e-4
    assert lr_at(config, 4_198_000, total) == 2e-4  # last stable step
    assert lr_at(config, 4_198_000 + 261_000, total) == pytest.approx(1e-4)
    assert lr_at(config, total, total) == 0.0


@pytest.mark.parametrize("shape,midpoint", [("linear", 0.5), ("cosine", 0.5), ("1-sqrt", 1 - math.sqrt(0.5))])
def test_wsd_shapes_and_fraction(shape, midpoint):
    config = _config(kind="wsd", lr=1.0, min_lr=0.1, warmup_steps=10, decay_fraction=0.2,
                     decay_shape=shape)
    assert lr_at(config, 80, 100) == 1.0
    assert lr_at(config, 90, 100) == pytest.approx(0.1 + 0.9 * midpoint)
    assert lr_at(config, 100, 100) == pytest.approx(0.1)


def test_cosine_multistep_constant():
    cosine = _config(kind="cosine", lr=1.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(cosine, 50, 100) == pytest.approx(0.5)
    assert lr_at(cosine, 100, 100) == pytest.approx(0.0)
    steps = _config(kind="multistep", lr=1.0, warmup_steps=0)
    assert [lr_at(steps, s, 100) for s in (80, 81, 90, 91)] == [1.0, 0.316, 0.316, 0.1]
    constant = _config(kind="constant", lr=3e-4, warmup_steps=4)
    assert lr_at(constant, 2, 10) == pytest.approx(1.5e-4) and lr_at(constant, 9, 10) == 3e-4


def test_invalid_schedules_are_named():
    with pytest.raises(ConfigError, match="decay_steps or decay_fraction, not both"):
        _config(kind="wsd", decay_steps=5, decay_fraction=0.1)
    assert _config(kind="wsd").decay_length(200) == 20  # the default: the last 10%
    with pytest.raises(ConfigError, match="min_lr"):
        _config(kind="cosine", lr=1e-4, min_lr=1e-3)
    with pytest.raises(ConfigError, match="milestones and decay_factors"):
        _config(kind="multistep", milestones=[0.5], decay_factors=[0.1, 0.01])
    with pytest.raises(ConfigError, match="exceed training.train_steps"):
        _config(kind="wsd", warmup_steps=10, decay_steps=95).check_against(100)
    with pytest.raises(ConfigError, match="unknown field"):
        _config(kind="wsd", decay_steps=5, peak=1)


def test_decay_runs_from_lr_at_the_first_step_to_min_lr_at_the_last():
    config = ScheduleConfig(kind="decay", lr=4e-3, min_lr=1e-4, warmup_steps=0, decay_shape="1-sqrt")
    config.validate()
    lrs = [lr_at(config, s, 5) for s in range(1, 6)]
    assert lrs[0] == 4e-3 and lrs[-1] == pytest.approx(1e-4)
    assert lrs[2] == pytest.approx(1e-4 + (4e-3 - 1e-4) * (1 - 0.5 ** 0.5))
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
