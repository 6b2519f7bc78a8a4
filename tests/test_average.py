"""``megasmol average``: weighted averages of checkpoints, exact, from any layout, streamed."""

import json
import re
import shutil

import pytest
import torch

from megasmol.ckpt.reader import CheckpointReader
from tests.conftest import cli_in_process, run_cli, run_torchrun


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec

    root = tmp_path_factory.mktemp("average")
    for name, seed in (("a", 1), ("b", 2)):
        init_checkpoint(load_model_spec("smollm3-tiny"), root / name, seed=seed)
    return root


def _average(paths, out, weights=None):
    from megasmol.ckpt.average import average_checkpoints

    return average_checkpoints(paths, out, weights=weights)


def _expected(readers, weights, key):
    total = torch.zeros(readers[0].shape(key), dtype=torch.float64)
    for reader, weight in zip(readers, weights):
        total.add_(reader.read(key).to(torch.float64), alpha=weight)
    return total.to(readers[0].dtype(key))


def test_copies_average_to_themselves_and_a_merge_is_the_weighted_sum(inputs, megatron_runtime):
    out = cli_in_process("average", "--checkpoints", *[str(inputs / "a")] * 3, "--out", str(inputs / "same"),
                         "--quiet")
    assert out.returncode == 0, out.stderr
    assert "0.3333" in out.stdout and "(step 0)" in out.stdout
    # Named for what it is, never a training step's iter_*; latest names it; the output says so.
    written = inputs / "same" / "avg_iter_0000000-0000000-0000000"
    assert sorted(p.name for p in (inputs / "same").iterdir()) == ["avg_iter_0000000-0000000-0000000",
                                                                   "latest"]
    assert (inputs / "same" / "latest").read_text().strip() == written.name
    assert re.search(re.escape(f"wrote {written}: an equal-weight average of 3 checkpoints (steps 0, "
                               "0, 0), ") + r"\d+ tensors, " + re.escape(
        f"weights only; {inputs / 'same' / 'latest'} names it"), out.stdout), out.stdout
    a, b = CheckpointReader(inputs / "a"), CheckpointReader(inputs / "b")
    same = CheckpointReader(inputs / "same")
    assert same.keys() == a.keys()
    for key in a.keys():
        assert same.read(key).equal(a.read(key)), key

    report = _average([inputs / "a", inputs / "b"], inputs / "merge", weights=[0.9, 0.1])
    assert report.path == inputs / "merge" / "avg_iter_0000000-0000000"
    assert report.describe() == "a linear merge of 2 checkpoints (steps 0, 0; weights 0.9, 0.1)"
    merge = CheckpointReader(inputs / "merge")
    for key in a.keys():
        got, expected = merge.read(key), _expected([a, b], [0.9, 0.1], key)
        assert got.equal(expected), key
        if not a.read(key).equal(b.read(key)):  # norms start at 1 in both
            assert not got.equal(a.read(key))
    meta = json.loads((merge.path / "megasmol.json").read_text())
    assert [s["weight"] for s in meta["averaged_from"]] == [0.9, 0.1]
    assert "train_state" not in meta  # weights only


def test_an_average_is_named_for_its_inputs():
    from megasmol.ckpt.average import averaged_dirname

    assert averaged_dirname([10, 20]) == "avg_iter_0000010-0000020"
    assert averaged_dirname([4500, 4000, 5000, 3500]) == "avg_iter_0004500-0004000-0005000-0003500"
    assert averaged_dirname(list(range(500, 6001, 500))) == "avg12_iter_0000500-0006000"


def test_blocks_smaller_than_a_tensor_give_the_same_average(inputs, megatron_runtime, monkeypatch):
    from megasmol.ckpt import average

    monkeypatch.setattr(average, "BLOCK_ELEMENTS", 1 << 14)  # the embedding in ~500 blocks
    average.average_checkpoints([inputs / "a", inputs / "b"], inputs / "blocked", weights=[0.25, 0.75])
    a, b = CheckpointReader(inputs / "a"), CheckpointReader(inputs / "b")
    blocked = CheckpointReader(inputs / "blocked")
    for key in a.keys():
        assert blocked.read(key).equal(_expected([a, b], [0.25, 0.75], key)), key


def test_inputs_from_tp2_and_pp2_layouts_average_like_their_tp1_originals(inputs, megatron_runtime):
    worker = "tests/workers/resave_layout.py"
    run_torchrun([worker, str(inputs / "a"), str(inputs / "a_tp2"), "2", "1",
                  str(inputs / "b"), str(inputs / "b_pp2"), "1", "2"])
    assert json.loads((inputs / "b_pp2/iter_0000003/megasmol.json").read_text())[
        "written_with"]["pipeline_parallel"] == 2
    _average([inputs / "a_tp2", inputs / "b_pp2"], inputs / "mixed")
    _average([inputs / "a", inputs / "b"], inputs / "plain")
    mixed, plain = CheckpointReader(inputs / "mixed"), CheckpointReader(inputs / "plain")
    for key in plain.keys():
        assert mixed.read(key).equal(plain.read(key)), key


def test_the_export_of_an_average_loads_in_transformers(inputs, megatron_runtime):
    from transformers import AutoModelForCausalLM

    from megasmol.convert.export import export_hf

    _average([inputs / "a", inputs / "b"], inputs / "for_hf")
    export_hf(inputs / "for_hf", inputs / "hf", show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(inputs / "hf")
    embedding = CheckpointReader(inputs / "for_hf").read("embedding.word_embeddings.weight")
    assert model.get_input_embeddings().weight.detach().equal(embedding)


def test_bad_inputs_are_named(inputs, tmp_path):
    from megasmol.ckpt.average import average_checkpoints
    from megasmol.ckpt.weights import check_weights
    from megasmol.config.typed import ConfigError

    with pytest.raises(ConfigError, match="sum to 0.9"):
        check_weights([0.5, 0.4], 2, normalize=True)
    assert check_weights([1.0, 1.0], 2, normalize=False) == [1.0, 1.0]  # --no-normalize
    with pytest.raises(ConfigError, match="2 weights for 1"):
        check_weights([0.5, 0.5], 1, normalize=True)
    with pytest.raises(ConfigError, match="finite"):
        check_weights([float("nan"), 1.0], 2, normalize=False)
    assert check_weights(None, 4, normalize=True) == [0.25] * 4
    with pytest.raises(ConfigError, match="all zero"):  # would write an all-zero model
        check_weights([0.0, 0.0], 2, normalize=False)

    deep = tmp_path / "deep"
    shutil.copytree(inputs / "a", deep)  # the same files, a spec that says 8 layers
    meta_file = deep / "iter_0000000" / "megasmol.json"
    meta = json.loads(meta_file.read_text())
    meta["model_spec"]["num_layers"] = 8
    meta_file.write_text(json.dumps(meta))
    out = run_cli("average", "--checkpoints", str(inputs / "a"), str(deep), str(tmp_path),
                  "--out", str(tmp_path / "z"), check=False)
    assert out.returncode == 2 and "not a megasmol checkpoint" in out.stderr
    with pytest.raises(ConfigError, match="model_spec.num_layers is 8"):
        average_checkpoints([inputs / "a", deep], tmp_path / "z")
    assert not (tmp_path / "z").exists()
