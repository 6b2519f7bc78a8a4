"""The ``rl:`` section: TRL's GRPOConfig names and defaults, and the combinations it refuses."""

import dataclasses

import pytest

from megasmol.config.rl import LOSS_TYPES, RLConfig
from megasmol.config.typed import ConfigError, from_dict, path_fields


def _rl(**fields) -> RLConfig:
    return from_dict(RLConfig, fields, "rl")


def test_defaults_are_trls():
    from trl import GRPOConfig

    ours = RLConfig()
    ours.validate()
    theirs = GRPOConfig(output_dir="unused", use_cpu=True, report_to="none",
                        per_device_train_batch_size=8)
    shared = ("num_generations", "max_completion_length", "temperature", "top_p", "top_k",
              "loss_type", "importance_sampling_level", "epsilon", "epsilon_high", "delta",
              "sapo_temperature_pos", "sapo_temperature_neg", "scale_rewards", "beta",
              "use_bias_correction_kl", "num_iterations")
    for name in shared:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.clip_high == ours.epsilon
    assert path_fields(RLConfig) == {}


def test_field_docs_present():
    from megasmol.config.reference import field_docs

    docs = field_docs(RLConfig)
    assert set(docs) == {f.name for f in dataclasses.fields(RLConfig)}


def test_loss_types_each_have_a_loss():
    from megasmol.rl.policy_loss import LOSSES

    assert set(LOSSES) == set(LOSS_TYPES)


@pytest.mark.parametrize("fields, message", [
    ({"num_generations": 1}, "rl.num_generations must be >= 2"),
    ({"temperature": 0.0}, "rl.temperature must be > 0"),
    ({"epsilon": 0.2, "epsilon_high": 0.1}, r"rl.epsilon_high \(0.1\) must be >= rl.epsilon"),
    ({"epsilon": 1.0}, "rl.epsilon must be in"),
    ({"loss_type": "cispo"}, "rl.epsilon_high must be given with rl.loss_type cispo"),
    ({"loss_type": "sapo", "delta": 2.0}, "rl.delta .* not rl.loss_type sapo"),
    ({"delta": 0.9}, "rl.delta must be > 1"),
    ({"beta": -0.1}, "rl.beta must be >= 0"),
    ({"top_p": 0.0}, r"rl.top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "rl.top_k must be >= 0"),
    ({"num_iterations": 0}, "rl.num_iterations must be >= 1"),
    ({"max_completion_length": 0}, "rl.max_completion_length must be >= 1"),
    ({"sapo_temperature_neg": 0.0}, "rl.sapo_temperature_neg must be > 0"),
    ({"max_refills": -1}, "rl.max_refills must be >= 0"),
    ({"scale_rewards": "std"}, r"rl.scale_rewards: 'std' is not one of \['group', 'batch', 'none'\]"),
    ({"loss_type": "ppo"}, "rl.loss_type: 'ppo' is not one of"),
    ({"importance_sampling_level": "seq"}, "rl.importance_sampling_level: 'seq' is not one of"),
])
def test_refused_in_one_line(fields, message):
    with pytest.raises(ConfigError, match=message) as caught:
        _rl(**fields)
    assert "\n" not in str(caught.value)


def test_allowed_combinations():
    # cispo's cap is a weight, not a widening: below epsilon is fine; delta above 1 + epsilon_high
    assert _rl(loss_type="cispo", epsilon_high=0.1).clip_high == 0.1
    assert _rl(epsilon_high=0.28, delta=1.5).clip_high == 0.28
    assert _rl(beta=0.04, use_bias_correction_kl=False).beta == 0.04
    # TRL warns (does not refuse) for a sequence-level weight under a token-sum loss; so do we
    assert _rl(importance_sampling_level="sequence", loss_type="dapo").cautions() == [
        "rl.importance_sampling_level sequence with rl.loss_type dapo weighs each completion by its "
        "length; GSPO's setup is rl.loss_type grpo"]
    assert _rl(importance_sampling_level="sequence", loss_type="grpo").cautions() == []
    assert _rl(loss_type="sapo").cautions() == []
