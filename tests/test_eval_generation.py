"""Generative tasks: generations cut at ``max_gen_tokens`` are counted (table, results.json,
samples.jsonl), generation has its own progress (task, prompts, tokens, tokens/s), and a row that
stops leaves the batch on both decoding paths (one process with the KV cache; the pipeline path
of torchrun and the training loop)."""

import json
from pathlib import Path

import pytest
import yaml

from megasmol.eval.outputs import write_outputs
from megasmol.eval.runner import evaluate, table
from megasmol.eval.scoring.gen_progress import GenerationProgress
from megasmol.eval.scoring.requests import Generation, GenerationRequest
from megasmol.eval.scoring.scorers import megatron_scorer
from megasmol.eval.tasks.spec import TaskSpec
from megasmol.eval.tasks.task import Task
from megasmol.model.init import init_checkpoint
from megasmol.tokenizer import load_tokenizer
from tests.conftest import REPO, run_cli
from tests.specs import tiny_smollm3

ITEMS = Path(__file__).parent / "fixtures" / "eval" / "items.jsonl"
NEVER = "<a stop string no model writes>"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, llama_tokenizer_dir):
    path = tmp_path_factory.mktemp("genmodel") / "ckpt"
    init_checkpoint(tiny_smollm3(), path, seed=11, tokenizer=llama_tokenizer_dir)
    return path


def _task(name: str, until: list[str], max_gen_tokens: int) -> Task:
    return Task(TaskSpec(name=name, formulation="fg", data_files=str(ITEMS), until=until,
                         answer="{{choices[0]}}", max_gen_tokens=max_gen_tokens), ITEMS.parent)


def test_generations_that_reach_max_gen_tokens_are_counted(checkpoint, llama_tokenizer_dir, tmp_path):
    """A stop string the model never writes: every generation is cut at the limit. The empty
    string is in every text, so the other task's generations stop after one token: none cut."""
    scorer = megatron_scorer(checkpoint, load_tokenizer(llama_tokenizer_dir))
    never, stops = evaluate([_task("never", [NEVER], 4), _task("stops", [""], 4)], scorer, limit=5)
    assert (never.truncated, stops.truncated) == (5, 0)
    assert [s.truncated for s in never.samples] == [True] * 5
    assert [s.truncated for s in stops.samples] == [False] * 5
    shown = table([never, stops])
    assert "truncated" in shown.splitlines()[0] and "5/5" in shown and "0/5" in shown
    results, samples = write_outputs([never, stops], tmp_path, "m", {})
    document = json.loads(results.read_text())["results"]
    assert (document["never"]["truncated"], document["never"]["truncated_fraction"]) == (5, 1.0)
    assert (document["stops"]["truncated"], document["stops"]["max_gen_tokens"]) == (0, 4)
    lines = [json.loads(x) for x in samples.read_text().splitlines()]
    assert [x["truncated"] for x in lines] == [True] * 5 + [False] * 5


def test_truncated_means_the_limit_without_eos_or_a_stop_string(llama_tokenizer_dir):
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    request = GenerationRequest("x", ("\n\n",), 3)
    words = tokenizer.encode(" a b", add_special_tokens=False)
    stop = tokenizer.encode("\n\n", add_special_tokens=False)
    eos = tokenizer.eos_token_id
    assert len(words) == 2 and len(stop) == 1
    assert request.result(tokenizer, words + words[:1]).truncated  # 3 ids, no stop
    assert not request.result(tokenizer, words + [eos]).truncated  # EOS as the last allowed id
    assert not request.result(tokenizer, words + stop).truncated
    assert not request.result(tokenizer, words[:1]).truncated  # stopped early (EOS or a stop)
    assert request.result(tokenizer, words + [eos]) == Generation(" a b", 3, False)


def test_the_command_shows_generation_progress_and_the_truncated_count(checkpoint, tmp_path):
    (tmp_path / "never.yaml").write_text(yaml.safe_dump({
        "name": "never_stops", "formulation": "fg", "data_files": str(ITEMS), "until": [NEVER],
        "answer": "{{choices[0]}}",
        "max_gen_tokens": 5}))
    out = tmp_path / "out"
    proc = run_cli("eval", "tasks", "--checkpoint", str(checkpoint), "--tasks",
                   str(tmp_path / "never.yaml"), "--limit", "6", "--out", str(out))
    # Its own bar: the task, prompts done, tokens generated (6 prompts x 5), tokens/s.
    [final] = [part for part in proc.stderr.split("\r") if "generate never_stops" in part][-1:]
    assert "6/6" in final and "30 tok, " in final and " tok/s, 6 truncated" in final, final
    lines = proc.stdout.splitlines()
    header = next(x for x in lines if x.startswith("task "))
    row = next(x for x in lines if x.startswith("never_stops "))
    assert header.split()[-1] == "truncated" and row.split()[-1] == "6/6", proc.stdout
    [written] = [x.split(": ", 1)[1] for x in lines if x.startswith("results: ")]
    result = json.loads((REPO / written).read_text())["results"]["never_stops"]
    assert (result["truncated"], result["truncated_fraction"], result["max_gen_tokens"]) == (6, 1.0, 5)


def test_the_pipeline_path_drops_finished_rows_and_generates_what_one_process_does(
        checkpoint, llama_tokenizer_dir):
    """torchrun's and the training loop's decoding (``decode.parallel``, here on one rank, one
    row per micro-batch): a row that stops after its first token is not fed again, so the model
    runs 1 + 6 + 6 rows, not 3 x 6, and the tokens, texts and truncation are the one-process
    path's."""
    from megasmol.eval.scoring.parallel_scorer import PipelineScorer
    from megasmol.model.load import load_checkpoint_model
    from megasmol.runtime.distributed import shutdown

    tokenizer = load_tokenizer(llama_tokenizer_dir)
    requests = [GenerationRequest("The capital of France is", ("",), 6),
                GenerationRequest("def add(a, b):\n    return", (NEVER,), 6),
                GenerationRequest("A cat says", (NEVER,), 6)]
    try:
        chunk, spec, _ = load_checkpoint_model(checkpoint)
        fed = []
        chunk.embedding.register_forward_hook(
            lambda module, args, kwargs, out: fed.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        pipeline = PipelineScorer(chunk, chunk, micro_batch_size=1, vocab_size=spec.vocab_size,
                                  max_length=spec.max_position_embeddings, tokenizer=tokenizer, name="t")
        counted = GenerationProgress(total=len(requests))
        split = pipeline.generations(requests, counted)
        alone = GenerationProgress(total=len(requests))
        one = megatron_scorer(checkpoint, tokenizer).generations(requests, alone)
    finally:
        shutdown()
    assert split == one and [g.tokens for g in one] == [1, 6, 6]
    assert [g.truncated for g in one] == [False, True, True]
    assert sum(fed) == 13 and counted.steps == 6
    for progress in (counted, alone):
        assert (progress.tokens, progress.prompts, progress.truncated) == (13, 3, 2)


def test_transformers_generation_reports_each_step(checkpoint, llama_tokenizer_dir, tmp_path):
    """``--hf``: transformers' generate streams each step's tokens to the progress; the texts,
    token counts and truncation are the Megatron-Core path's."""
    from megasmol.convert.export import export_hf
    from megasmol.eval.scoring.scorers import hf_scorer

    export_hf(checkpoint, tmp_path / "hf", show_progress=False)
    tokenizer = load_tokenizer(llama_tokenizer_dir)
    requests = [GenerationRequest(p, (NEVER,), 5) for p in ("A cat says", "2 + 2 =", "Monday, Tuesday,")]
    streamed = GenerationProgress(total=3)
    hf = hf_scorer(tmp_path / "hf", tokenizer).generations(requests, streamed)
    assert hf == megatron_scorer(checkpoint, tokenizer).generations(requests)
    assert [g.truncated for g in hf] == [True] * 3
    assert (streamed.tokens, streamed.steps, streamed.prompts, streamed.truncated) == (15, 5, 3, 3)
