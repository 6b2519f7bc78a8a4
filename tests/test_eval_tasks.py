"""Downstream evaluation: the numbers are lm-evaluation-harness's numbers.

A tiny random SmolLM3 (the Llama-3.2 tokenizer) is exported to Hugging Face format; the task
file in tests/fixtures/eval is scored by megasmol (through the Megatron-Core model and through
transformers) and by EleutherAI's lm-eval (``HFLM`` with the same file as a custom task), in
cloze and multiple-choice formulations. Per-example log-likelihoods must agree within 1e-4 and
acc / acc_norm must be identical.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from megasmol.config.typed import ConfigError
from megasmol.convert.export import export_hf
from megasmol.eval.runner import evaluate
from megasmol.eval.scoring.scorers import hf_scorer, megatron_scorer
from megasmol.eval.tasks.registry import load_task
from megasmol.eval.tasks.spec import TaskSpec
from megasmol.eval.tasks.task import Task
from megasmol.model.init import init_checkpoint
from megasmol.tokenizer import load_tokenizer
from tests.conftest import cli_in_process, run_cli
from tests.specs import tiny_smollm3

ITEMS = Path(__file__).parent / "fixtures" / "eval" / "items.jsonl"
WINOGRANDE = Path(__file__).parent / "fixtures" / "eval" / "winogrande.jsonl"
LETTERS = "ABCD"

LM_EVAL_TASKS = {
    "cf": {"doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "target_delimiter": "",
           "metric_list": [{"metric": m} for m in ("acc", "acc_norm", "acc_bytes", "acc_mutual_info")]},
    "mcf": {"doc_to_text": "{{context}}\n{% for c in choices %}{{'ABCD'[loop.index0]}}. {{c}}\n"
                           "{% endfor %}Answer:",
            "doc_to_choice": "{{['A', 'B', 'C', 'D'][:choices|length]}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}]},
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, llama_tokenizer_dir):
    root = tmp_path_factory.mktemp("evalmodel")
    init_checkpoint(tiny_smollm3(), root / "ckpt", seed=11, tokenizer=llama_tokenizer_dir)
    export_hf(root / "ckpt", root / "hf", show_progress=False)
    return root


def lm_eval_tasks(folder):
    """lm-eval's task manager over the task files in ``folder`` alone: they define their tasks or
    name lm-eval's own YAMLs by path (``include``), so the index of every built-in task, which
    took 11-13 s of CPU per manager on the 2-core VM, is not built."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=False)


def _lm_eval(hf_dir, formulation, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    name = f"megasmol_parity_{formulation}"
    (tmp_path / "tasks").mkdir(exist_ok=True)
    (tmp_path / "tasks" / f"{name}.yaml").write_text(yaml.safe_dump({
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(ITEMS)}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_target": "{{gold}}",
        **LM_EVAL_TASKS[formulation]}))
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=[name], log_samples=True,
                                  task_manager=lm_eval_tasks(tmp_path / "tasks"))
    samples = sorted(out["samples"][name], key=lambda s: s["doc_id"])
    lls = [[resp[0][0] for resp in s["resps"]] for s in samples]
    metrics = {m: [s[m] for s in samples] for m in ("acc", "acc_norm", "acc_bytes", "acc_mutual_info")
               if m in samples[0]}
    return lls, metrics


def _mcf_task():
    return Task(TaskSpec(name="items_mcf", formulation="mcf", data_files=str(ITEMS)), ITEMS.parent)


def _cf_task():
    """The file task, with every accuracy lm-eval also computes."""
    metrics = ["acc", "acc_norm", "acc_bytes", "acc_mutual_info"]
    return Task(TaskSpec(name="items", data_files=str(ITEMS), target_delimiter="", metrics=metrics),
                ITEMS.parent)


@pytest.mark.parametrize("formulation", ["cf", "mcf"])
def test_loglikelihoods_and_accuracies_equal_lm_eval(model, tmp_path, monkeypatch, formulation,
                                                     llama_tokenizer_dir):
    expected_lls, expected = _lm_eval(model / "hf", formulation, tmp_path, monkeypatch)
    task = _cf_task() if formulation == "cf" else _mcf_task()
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    for scorer in (hf_scorer(model / "hf", tokenizer), megatron_scorer(model / "ckpt", tokenizer)):
        [result] = evaluate([task], scorer)
        got = [s.loglikelihoods for s in result.samples]
        assert len(got) == len(expected_lls) == 12
        for sample, theirs in zip(result.samples, expected_lls):  # lm-eval's unconditional ones after
            assert sample.loglikelihoods == pytest.approx(theirs[:len(sample.loglikelihoods)], abs=1e-4)
            if formulation == "cf":
                assert sample.unconditional == pytest.approx(theirs[len(sample.loglikelihoods):], abs=1e-4)
        for metric, values in expected.items():
            assert [s.metrics[metric] for s in result.samples] == values, (scorer.name, metric)
            assert result.metrics[metric][0] == pytest.approx(sum(values) / len(values))
    # The test can fail: the distinct choices do get distinct scores, and the normalizations
    # do not all pick the same choice.
    assert len({round(v, 3) for row in expected_lls for v in row}) > 20
    if formulation == "cf":
        assert expected["acc_mutual_info"] != expected["acc"] != expected["acc_norm"]
        per_token = evaluate([Task(TaskSpec(name="t", data_files=str(ITEMS), target_delimiter="",
                                            metrics=["acc_per_token"]), ITEMS.parent)], scorer)[0]
        for sample in per_token.samples:  # OLMES's per-token normalization (no lm-eval metric)
            counts = [len(tokenizer.encode(sample.prompt + c)) - len(tokenizer.encode(sample.prompt))
                      for c in sample.continuations]
            normed = [ll / n for ll, n in zip(sample.loglikelihoods, counts)]
            assert sample.metrics["acc_per_token"] == float(normed.index(max(normed)) == sample.gold)


def test_winogrande_partial_scoring_equals_lm_eval(model, tmp_path, monkeypatch, llama_tokenizer_dir):
    """lm-eval's own winogrande definition (its YAML and preprocess functions, only the data
    pointed at the fixture) against megasmol's winogrande task on the same rows."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from megasmol.config.typed import from_dict, load_yaml
    from megasmol.eval.tasks.registry import TASK_DIR

    (tmp_path / "tasks").mkdir()
    reference = Path(lm_eval.__file__).parent / "tasks" / "winogrande" / "default.yaml"
    (tmp_path / "tasks" / "wg.yaml").write_text(yaml.safe_dump({
        "include": str(reference), "task": "megasmol_winogrande", "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(WINOGRANDE), "validation": str(WINOGRANDE)}}}))
    lm = HFLM(pretrained=str(model / "hf"), device="cpu", dtype="float32", batch_size=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=["megasmol_winogrande"], log_samples=True,
                                  task_manager=lm_eval_tasks(tmp_path / "tasks"))
    samples = sorted(out["samples"]["megasmol_winogrande"], key=lambda s: s["doc_id"])
    expected = [[resp[0][0] for resp in s["resps"]] for s in samples]
    spec = from_dict(TaskSpec, {**load_yaml(TASK_DIR / "winogrande.yaml"), "hf_dataset": None,
                                "data_files": str(WINOGRANDE)})
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    task = Task(spec, WINOGRANDE.parent)
    for scorer in (hf_scorer(model / "hf", tokenizer), megatron_scorer(model / "ckpt", tokenizer)):
        [result] = evaluate([task], scorer)
        assert len(result.samples) == len(expected) == 10
        for mine, theirs in zip(result.samples, expected):
            assert mine.loglikelihoods == pytest.approx(theirs, abs=1e-4), scorer.name
        assert [s.metrics["acc"] for s in result.samples] == [s["acc"] for s in samples]
    assert result.samples[0].continuations == [
        "The suitcase would not fit in the car trunk because the suitcase was too large.",
        "The suitcase would not fit in the car trunk because the trunk was too large."]
    assert result.chance == 0.5 and set(result.metrics) == {"acc", "gold_loglik"}
    # Few-shot: a shot is written with its right option filled in, as lm-eval writes one.
    from megasmol.eval.formulations.registry import scoring_pairs

    first, second = task.examples()[:2]
    prompt, pairs, _ = scoring_pairs(second, "partial", " ", [first])
    assert prompt == "The suitcase would not fit in the car trunk because the suitcase was too large.\n\n"
    assert pairs[1] == (prompt + "The suitcase would not fit in the car trunk because the trunk",
                        " was too small.")


def test_cli_writes_results_and_samples(model, tmp_path):
    out = tmp_path / "out"
    proc = cli_in_process("eval", "tasks", "--checkpoint", str(model / "ckpt"), "--tasks",
                          f"{ITEMS},demo_arithmetic", "--limit", "20", "--out", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "acc_norm" in proc.stdout and "demo_arithmetic" in proc.stdout
    # lm-eval's layout, the paths printed: OUT/MODEL/TIMESTAMP/ (MODEL: the model's path, / as __).
    written = Path(proc.stdout.split("results: ")[1].split()[0])
    assert written.parent.parent == out / str(model / "ckpt").strip("/").replace("/", "__")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d", written.parent.name)
    assert f"samples: {written.parent / 'samples.jsonl'}" in proc.stdout
    results = json.loads(written.read_text())["results"]
    assert results["items"]["examples"] == 12 and results["demo_arithmetic"]["examples"] == 20
    assert results["demo_arithmetic"]["chance"] == 0.25
    for key in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert key in results["items"]
    samples = [json.loads(x) for x in (written.parent / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and {"prompt", "continuations", "loglikelihoods", "gold"} <= set(samples[0])
    # The same seeded subset every time; --overwrite writes OUT's own files, replacing them.
    (tmp_path / "again").mkdir()
    (tmp_path / "again" / "results.json").write_text("an earlier evaluation's")
    again = cli_in_process("eval", "tasks", "--hf", str(model / "hf"), "--tasks", "demo_arithmetic",
                           "--limit", "20", "--out", str(tmp_path / "again"), "--quiet", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert f"results: {tmp_path / 'again' / 'results.json'}" in again.stdout
    assert json.loads((tmp_path / "again" / "results.json").read_text())["results"]["demo_arithmetic"]
    prompts = [s["prompt"] for s in samples if s["task"] == "demo_arithmetic"]
    assert prompts == [json.loads(x)["prompt"] for x in
                       (tmp_path / "again" / "samples.jsonl").read_text().splitlines()]


def test_an_evaluation_never_replaces_an_earlier_ones_results(tmp_path):
    """Two evaluations of one model (even in the same second) get a directory each, under the
    model's; nothing half-written is left beside them; score_table reads the newest."""
    import subprocess
    import sys
    from datetime import datetime

    from megasmol.eval.outputs import model_dirname, write_new_outputs
    from megasmol.eval.runner import TaskResult

    def result(acc):
        return [TaskResult("t", "cf", {"acc": (acc, 0.1)}, 2, 0.25, 0)]

    now = datetime(2026, 12, 3, 13, 42, 10)
    first, _ = write_new_outputs(result(0.5), tmp_path, "runs/demo/hf", {}, now=now)
    second, samples = write_new_outputs(result(0.75), tmp_path, "runs/demo/hf", {}, now=now)
    assert first == tmp_path / "runs__demo__hf" / "2026-12-03T13-42-10" / "results.json"
    assert second == tmp_path / "runs__demo__hf" / "2026-12-03T13-42-10-2" / "results.json"
    assert samples == second.parent / "samples.jsonl" and samples.is_file()
    assert json.loads(first.read_text())["results"]["t"]["acc"] == 0.5  # the first one's, kept
    assert json.loads(second.read_text())["results"]["t"]["acc"] == 0.75
    assert sorted(p.name for p in (tmp_path / "runs__demo__hf").iterdir()) == [
        "2026-12-03T13-42-10", "2026-12-03T13-42-10-2"]
    assert model_dirname(str(Path.cwd() / "runs" / "x y")) == "runs__x__y"  # relative, no spaces

    table = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "score_table.py"),
                            str(tmp_path)], capture_output=True, text=True, check=True).stdout
    assert table.splitlines()[2].split() == [tmp_path.name, "0.7500"]
    write_new_outputs(result(0.25), tmp_path, "runs/other", {}, now=now)
    mixed = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" / "score_table.py"),
                            str(tmp_path)], capture_output=True, text=True)
    assert mixed.returncode != 0 and "evaluations of 2 models" in mixed.stderr


def test_bad_task_input_gives_one_clear_error(tmp_path, model):
    cases = {
        '{"context": "a", "choices": [" b"]}': "missing field 'gold'",
        '{"context": "a", "choices": [" b", " c"], "gold": 2}': "gold 2 is out of range",
        '{"context": "a", "choices": [" b", " c"], "gold": true}': "gold True is not an index",
        '{"context": "a", "choices": [], "gold": 0}': "non-empty list of strings",
        "{broken": "not valid JSON",
    }
    for line, message in cases.items():
        path = tmp_path / "bad.jsonl"
        path.write_text(line + "\n")
        with pytest.raises(ConfigError, match=message):
            load_task(str(path)).examples()
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        load_task("nope")
    proc = cli_in_process("eval", "tasks", "--checkpoint", str(model / "ckpt" / "iter_0000000" / "tokenizer"),
                          "--tasks", str(ITEMS), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_an_out_under_a_file_is_refused_before_anything_is_read(tmp_path):
    """``--out FILE/sub`` used to fail with a traceback after all the scoring, the results lost:
    it is one line naming --out, said before the model (here not even a checkpoint) is read."""
    (tmp_path / "afile").write_text("x")
    (tmp_path / "ck").mkdir()  # looks like an iteration directory; loading it would fail
    (tmp_path / "ck" / "megasmol.json").write_text("{}")
    proc = run_cli("eval", "tasks", "--checkpoint", str(tmp_path / "ck"), "--tasks", str(ITEMS),
                   "--out", str(tmp_path / "afile" / "sub"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert f"--out {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file" in proc.stderr


def test_task_definitions_render_records_like_lm_eval(tmp_path):
    """The built-in YAMLs map dataset records with Jinja; offline they read a local copy
    (rows here in ARC's schema, as ``datasets`` gives them)."""
    spec = yaml.safe_load((Path("megasmol/eval/tasks/task_defs/arc_easy.yaml")).read_text())
    spec.update(data_files=str(ITEMS.parent / "arc_rows.jsonl"), hf_dataset=None)
    (tmp_path / "arc_local.yaml").write_text(yaml.safe_dump(spec))
    examples = load_task(str(tmp_path / "arc_local.yaml")).examples()
    assert [e.context for e in examples][0] == "Question: Which gas do plants absorb?\nAnswer:"
    assert [e.choices for e in examples][1] == ["Ice", "Steam", "Fog", "Dew"]
    assert [e.gold for e in examples] == [1, 0, 1]
    for name in ("arc_easy", "arc_challenge", "piqa", "commonsense_qa", "openbookqa", "mmlu_cf",
                 "mmlu_mcf"):
        assert load_task(name).spec.hf_dataset  # every built-in definition parses


@pytest.fixture(scope="module")
def single_process_lls(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert cli_in_process("eval", "tasks", "--checkpoint", str(model / "ckpt"), "--tasks", str(ITEMS),
                          "--out", str(out), "--quiet", "--overwrite").returncode == 0
    return out


def _lls(out):
    return [json.loads(x)["loglikelihoods"] for x in (out / "samples.jsonl").read_text().splitlines()]


# The same PipelineScorer runs under TP=2 and PP=2 in the loop (test_eval_in_loop.py, which also
# compares with this command's single-process scores); CP and DP are checked here.
@pytest.mark.parametrize("layout", [["--context-parallel", "2"], []], ids=["cp2", "dp2"])
def test_under_torchrun_the_loglikelihoods_equal_one_process(model, single_process_lls, tmp_path, layout):
    from tests.conftest import run_torchrun

    split = tmp_path / "split"
    run_torchrun(["-m", "megasmol", "eval", "tasks", "--checkpoint", str(model / "ckpt"), "--tasks",
                  str(ITEMS), "--out", str(split), "--quiet", "--overwrite", *layout], timeout=300)
    for mine, reference in zip(_lls(split), _lls(single_process_lls), strict=True):
        assert mine == pytest.approx(reference, abs=1e-4)
    assert (json.loads((split / "results.json").read_text())["results"]["items"]["acc"]
            == json.loads((single_process_lls / "results.json").read_text())["results"]["items"]["acc"])


def test_the_pipeline_scorer_runs_a_shared_context_once_where_a_rank_holds_the_whole_model(
        model, llama_tokenizer_dir):
    """TP = PP = CP = 1 (one process here; DP ranks take whole questions, the dp2 case above): the
    in-loop and torchrun scorer runs each question's context once, with the log-likelihoods of
    each pair scored whole. An attention backend that would not see the padding masks (Transformer
    Engine's) scores each pair whole."""
    from megasmol.eval.scoring.parallel_scorer import PipelineScorer
    from megasmol.eval.scoring.requests import encode_pair
    from megasmol.model.load import load_checkpoint_model
    from megasmol.runtime.distributed import shutdown

    tokenizer = load_tokenizer(llama_tokenizer_dir)
    chunk, spec, _ = load_checkpoint_model(model / "ckpt")
    items = [json.loads(line) for line in ITEMS.read_text().splitlines()]
    requests = [encode_pair(tokenizer, item["context"], choice)
                for item in items for choice in item["choices"]]
    fed = []
    chunk.embedding.register_forward_hook(
        lambda module, args, kwargs, out: fed.append(kwargs["input_ids"].numel()), with_kwargs=True)

    def score() -> tuple[list[float], int]:
        fed.clear()
        scorer = PipelineScorer(chunk, chunk, micro_batch_size=4, vocab_size=spec.vocab_size,
                                max_length=spec.max_position_embeddings, tokenizer=tokenizer,
                                name="test")
        return scorer.loglikelihoods(requests), sum(fed)

    try:
        shared, shared_tokens = score()
        backend, chunk.attention_backend = chunk.attention_backend, "te"
        whole, whole_tokens = score()
        chunk.attention_backend = backend
    finally:
        shutdown()
    assert shared == pytest.approx(whole, abs=1e-4)
    assert shared_tokens < 0.6 * whole_tokens, (shared_tokens, whole_tokens)


def test_free_generation_is_the_same_on_both_backends_and_scored_by_exact_match(model, tmp_path,
                                                                                llama_tokenizer_dir):
    from megasmol.eval.formulations.generation import extract_answer, normalize_answer

    pattern = TaskSpec(name="x", data_files="-").answer_pattern
    assert extract_answer("so 3 + 4 = 7, then $1,250.", pattern) == "$1,250."
    assert normalize_answer("$1,250.") == "1250" and extract_answer("no number", pattern) == ""
    outputs = {}
    for flag, source in (("--checkpoint", model / "ckpt"), ("--hf", model / "hf")):
        out = tmp_path / flag.strip("-")
        assert cli_in_process("eval", "tasks", flag, str(source), "--tasks", "demo_arithmetic_gen",
                              "--limit", "4", "--out", str(out), "--quiet", "--overwrite").returncode == 0
        outputs[flag] = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    # Megatron-Core with its KV cache and transformers' generate write the same text, decoding the
    # four prompts (of different lengths) as one batch; one prompt at a time writes it too.
    assert len({len(s["prompt"]) for s in outputs["--hf"]}) > 1
    alone = megatron_scorer(model / "ckpt", load_tokenizer(llama_tokenizer_dir), batch_tokens=1)
    [result] = evaluate([load_task("demo_arithmetic_gen")], alone, limit=4)
    texts = {flag: [s["continuations"] for s in samples] for flag, samples in outputs.items()}
    assert texts["--checkpoint"] == texts["--hf"] == [s.continuations for s in result.samples]
    assert all(len(s["continuations"][0]) > 0 for s in outputs["--hf"])
    results = json.loads((tmp_path / "hf" / "results.json").read_text())["results"]
    assert results["demo_arithmetic_gen"]["examples"] == 4 and "exact_match" in results["demo_arithmetic_gen"]
    assert load_task("gsm8k").spec.formulation == "fg"


def test_hellaswag_preprocessing_matches_lm_eval(tmp_path):
    """The same record through lm-eval's own hellaswag preprocessing and through the YAML."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    record = json.loads((ITEMS.parent / "hellaswag_rows.jsonl").read_text())
    spec = yaml.safe_load(Path("megasmol/eval/tasks/task_defs/hellaswag.yaml").read_text())
    spec.update(data_files=str(ITEMS.parent / "hellaswag_rows.jsonl"), hf_dataset=None)
    (tmp_path / "hs.yaml").write_text(yaml.safe_dump(spec))
    [example] = load_task(str(tmp_path / "hs.yaml")).examples()
    ctx = record["ctx_a"] + " " + record["ctx_b"].capitalize()
    assert example.context == preprocess(record["activity_label"] + ": " + ctx)
    assert example.choices == [preprocess(e) for e in record["endings"]] and example.gold == 3


def test_few_shot_prompts_are_seeded_and_a_missing_tokenizer_is_named(model, tmp_path,
                                                                     llama_tokenizer_dir):
    scorer = megatron_scorer(model / "ckpt", load_tokenizer(llama_tokenizer_dir))
    runs = [evaluate([load_task("demo_arithmetic")], scorer, limit=3, num_fewshot=2, seed=s)[0]
            for s in (5, 5, 6)]
    prompts = [[s.prompt for s in r.samples] for r in runs]
    assert prompts[0] == prompts[1] != prompts[2]
    assert all(p.count("Question:") == 3 for p in prompts[0])  # two shots, then the question
    init_checkpoint(tiny_smollm3(), tmp_path / "bare")  # no tokenizer stored with it
    proc = cli_in_process("eval", "tasks", "--checkpoint", str(tmp_path / "bare"), "--tasks", str(ITEMS),
                          "--out", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no tokenizer stored with it" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_parity_tool_reports_agreement_with_lm_eval(model, capsys):
    """tools/lm_eval_parity.py on the tiny export: every metric agrees, and it says so."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("parity", Path(__file__).parents[1] / "tools" /
                                                  "lm_eval_parity.py")
    parity = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(parity)
    assert parity.main(["--hf", str(model / "hf"), "--checkpoint", str(model / "ckpt"),
                        "--task", str(ITEMS)]) == 0
    out = capsys.readouterr().out
    assert "agree with lm-eval" in out and out.count("(0)") == 8  # 2 scorers x 4 metrics
