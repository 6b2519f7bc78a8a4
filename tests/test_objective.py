"""The objective is a config choice (``training.objective``), checked against the data before
anything heavy: its default keeps configs that predate it training what they trained, and each
mismatch is one error naming the field and the dataset."""

import typing

import pytest

from megasmol.config.run import TrainingConfig, load_run_config
from megasmol.config.typed import ConfigError
from megasmol.data.preference.prepare import prepare_preferences
from megasmol.data.recipe import batch_schedule, load_recipe, plan_stages
from megasmol.train.objectives import OBJECTIVES, objective_kind
from megasmol.train.setup import check_objective_data
from tests.data_fixtures import random_documents, write_dataset
from tests.test_preference_data import _msg, _write

RECIPE = "name: {name}\nroot: data\nstages:\n  - name: s\n    start_step: 1\n    datasets:\n{entries}"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Pairs (``prepare-preferences``), plain tokens, and a recipe over each and over both."""
    root = tmp_path_factory.mktemp("objective")
    (root / "data").mkdir()
    records = [{"prompt": [_msg("user", f"What is {a} + 1?")], "chosen": [_msg("assistant", f"{a + 1}.")],
                "rejected": [_msg("assistant", f"{a + 2}.")]} for a in range(6)]
    _write(root / "pairs.jsonl", records)
    prepare_preferences([str(root / "pairs.jsonl")], str(root / "data" / "pref"), template="chatml",
                        show_progress=False)
    write_dataset(root / "data" / "plain", random_documents(20, 3, 200, 20, 60, seed=1))
    for name, paths in {"pref": ["pref"], "plain": ["plain"], "mixed": ["pref", "plain"]}.items():
        entries = "".join(f"      - {{path: {p}, weight: 1.0}}\n" for p in paths)
        (root / f"{name}.yaml").write_text(RECIPE.format(name=name, entries=entries))
    return root


def _config(root, recipe, preference_section=True, objective=None):
    text = (f"model: smollm3-tiny\ndata: {{recipe: {recipe}.yaml, seq_length: 128}}\n"
            "training: {train_steps: 2, global_batch_size: 2"
            + (f", objective: {objective}" if objective else "") + "}\n"
            + "schedule: {kind: cosine, warmup_steps: 0}\n"
            + ("preference: {loss_type: apo_zero, beta: 0.1}\n" if preference_section else ""))
    path = root / f"{recipe}-{preference_section}-{objective}.yaml"
    path.write_text(text)
    return load_run_config(path)


def _check(config):
    recipe = load_recipe(config.recipe_reference())
    plans = plan_stages(recipe, config.training.train_steps, batch_schedule(config.training),
                        config.data.seq_length)
    check_objective_data(objective_kind(config.objective), config, recipe, plans)


def test_the_default_keeps_a_preference_config_without_the_field_training_pairs(data_root):
    config = _config(data_root, "pref")  # a config written before training.objective existed
    assert config.objective == "preference"
    assert config.to_dict()["training"]["objective"] == "preference"
    _check(config)
    plain = _config(data_root, "plain", preference_section=False)
    assert plain.objective == "next_token" and plain.to_dict()["training"]["objective"] == "next_token"
    _check(plain)


def test_a_preference_section_with_next_token_is_refused_at_load(data_root):
    with pytest.raises(ConfigError, match=r"^preference: is set but training.objective is next_token"):
        _config(data_root, "plain", objective="next_token")


def test_the_preference_objective_on_token_data_names_the_field_and_the_file(data_root):
    config = _config(data_root, "plain", preference_section=False, objective="preference")
    with pytest.raises(ConfigError) as caught:
        _check(config)
    message = str(caught.value)
    assert message.startswith("training.objective=preference trains on preference pairs")
    assert f"reads {data_root}/data/plain, which is not: it is token or chat data" in message
    assert message.endswith("or set training.objective: next_token")


def test_next_token_on_pairs_names_the_field_and_the_file(data_root):
    config = _config(data_root, "pref", preference_section=False)
    with pytest.raises(ConfigError) as caught:
        _check(config)
    message = str(caught.value)
    assert message.startswith("training.objective=next_token (the default without a preference: "
                              "section) trains on token or chat data")
    assert f"reads {data_root}/data/pref, which is not: it is preference pairs" in message
    assert message.endswith("or set training.objective: preference")


def test_a_recipe_mixing_pairs_with_tokens_is_refused_for_either_objective(data_root):
    with pytest.raises(ConfigError, match=f"reads {data_root}/data/plain, which is not"):
        _check(_config(data_root, "mixed"))
    with pytest.raises(ConfigError, match=f"reads {data_root}/data/pref, which is not"):
        _check(_config(data_root, "mixed", preference_section=False))


def test_the_preference_objective_needs_a_reference_only_when_it_scores_one(data_root):
    config = _config(data_root, "pref")
    with pytest.raises(ConfigError, match="preference data need a reference model"):
        objective_kind("preference").check(config, needed=True)
    objective_kind("preference").check(config, needed=False)  # pre-flight's timed steps
    config.checkpoint.init_from = "sft"
    objective_kind("preference").check(config, needed=True)


def test_every_choice_of_the_field_is_a_registered_objective():
    (choices,) = [typing.get_args(arg) for arg in typing.get_args(
        typing.get_type_hints(TrainingConfig)["objective"]) if typing.get_args(arg)]
    assert set(choices) == set(OBJECTIVES)
    assert all(OBJECTIVES[name].name == name for name in OBJECTIVES)


def test_plain_cross_entropy_turns_z_loss_off_inside_and_back_on_after():
    import torch

    from megasmol.model.gpt import plain_cross_entropy

    model = torch.nn.Linear(1, 1)
    model.z_loss_coeff = 1e-4
    with plain_cross_entropy(model):
        assert model.z_loss_coeff == 0.0
        with plain_cross_entropy(model):
            assert model.z_loss_coeff == 0.0
        assert model.z_loss_coeff == 0.0
    assert model.z_loss_coeff == 1e-4
    with pytest.raises(RuntimeError), plain_cross_entropy(model):
        raise RuntimeError("a failed forward")
    assert model.z_loss_coeff == 1e-4
    bare = torch.nn.Linear(1, 1)
    with plain_cross_entropy(bare):
        assert not hasattr(bare, "z_loss_coeff")
