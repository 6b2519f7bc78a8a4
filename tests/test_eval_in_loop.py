"""Downstream tasks scored inside the training loop: the same numbers as ``megasmol eval tasks``
on the checkpoint of that step, under any layout, without changing a single training loss."""

import json

import pytest

from tests.conftest import run_cli
from tests.train_fixtures import step_losses, torchrun_train, train, write_training_run

WORDS = ["<unk>", "</s>"] + ("the a cat dog sat ran on under mat rug red blue one two three four "
                             "big small is was it").split()


@pytest.fixture(scope="module")
def vocab_tokenizer(tmp_path_factory):
    """A word-level tokenizer whose ids fit the 512-token test model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(out)
    return out


def _task_file(root):
    items = [
        {"context": "the cat sat on the", "choices": [" mat", " rug", " dog"], "gold": 0},
        {"context": "one two three", "choices": [" four", " one", " big red dog"], "gold": 0},
        {"context": "the big dog", "choices": [" ran", " sat", " is"], "gold": 1},
        {"context": "a small red", "choices": [" cat", " mat"], "gold": 0},
        {"context": "it was", "choices": [" blue", " the red cat", " two"], "gold": 2},
        {"context": "the dog ran under the", "choices": [" rug", " mat", " cat", " dog"], "gold": 3},
    ]
    path = root / "items.jsonl"
    path.write_text("".join(json.dumps(i) + "\n" for i in items))
    return path


def _config(root, tokenizer):
    task = _task_file(root)
    return write_training_run(
        root, steps=6, checkpoint={"interval": 3}, data={"tokenizer": str(tokenizer)},
        eval={"interval": 0, "tasks": [str(task)], "tasks_at_checkpoint": True})


def _downstream(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "downstream"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, vocab_tokenizer):
    root = tmp_path_factory.mktemp("single")
    config = _config(root, vocab_tokenizer)
    proc = train(config)
    return {"root": root, "config": config, "stdout": proc.stdout}


def test_in_loop_scores_equal_the_offline_command_and_change_no_loss(single, tmp_path):
    run = single["root"] / "run"
    scores = _downstream(run)
    assert sorted(scores) == [3, 6] and "downstream at step 6: items acc" in single["stdout"]
    plain = write_training_run(tmp_path, steps=6, checkpoint={"interval": 3}, eval={"interval": 0})
    train(plain)
    assert step_losses(run) == step_losses(tmp_path / "run")  # bit for bit
    for step in (3, 6):
        out = tmp_path / f"offline{step}"
        run_cli("eval", "tasks", "--checkpoint", str(run / "checkpoints" / f"iter_{step:07d}"),
                "--tasks", str(single["root"] / "items.jsonl"), "--out", str(out), "--quiet")
        offline = json.loads((out / "results.json").read_text())["results"]["items"]
        samples = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        gold = sum(s["loglikelihoods"][s["gold"]] for s in samples) / len(samples)
        assert scores[step]["items/acc"] == offline["acc"]
        assert scores[step]["items/acc_norm"] == offline["acc_norm"]
        assert scores[step]["items/gold_loglik"] == pytest.approx(gold, abs=1e-4)
    assert scores[3]["items/gold_loglik"] != scores[6]["items/gold_loglik"]  # training moved it


@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_in_loop_scores_are_the_same_under_tp_and_pp(single, tmp_path, vocab_tokenizer, layout):
    config = _config(tmp_path, vocab_tokenizer)
    init = f"checkpoint.init_from={single['root'] / 'run' / 'checkpoints' / 'iter_0000003'}"
    torchrun_train(config, layout, init, "training.train_steps=1", "schedule.warmup_steps=0",
                   "schedule.kind=constant", "schedule.lr=1e-30", "checkpoint.interval=0")
    reference = _downstream(single["root"] / "run")[3]
    [scores] = _downstream(tmp_path / "run").values()  # lr 1e-30: still the step-3 weights
    for key in ("items/acc", "items/acc_norm"):
        assert scores[key] == reference[key], key
    assert scores["items/gold_loglik"] == pytest.approx(reference["items/gold_loglik"], abs=1e-4)


def test_a_run_with_in_loop_evaluation_resumes_exactly(single, tmp_path, vocab_tokenizer):
    config = _config(tmp_path, vocab_tokenizer)
    train(config, "training.stop_after_step=3")
    train(config)  # resumes at step 3
    assert step_losses(tmp_path / "run") == step_losses(single["root"] / "run")
    resumed, whole = _downstream(tmp_path / "run"), _downstream(single["root"] / "run")
    assert resumed[6]["items/acc"] == whole[6]["items/acc"]
    assert resumed[6]["items/gold_loglik"] == pytest.approx(whole[6]["items/gold_loglik"], abs=1e-6)
