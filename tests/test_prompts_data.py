"""RL prompts (``prepare-prompts``): prompts rendered like the chat data, the reward's reference
kept (GSM8K answers reduced to the final number, HumanEval tests made runnable), bad records
counted by reason, the set written whole or not at all and read back by index."""

import json

import pytest

from megasmol.config.typed import ConfigError
from megasmol.data.chat.synthetic import arithmetic_pairs
from megasmol.data.messages.template import load_template
from megasmol.data.prompts import PromptRecord, is_prompt_set, read_prompts
from megasmol.data.prompts.prepare import prepare_prompts
from megasmol.data.prompts.records import Fields, final_answer, runnable_tests
from megasmol.data.prompts.synthetic import write_arithmetic_prompts
from megasmol.errors import OutputExists
from tests.conftest import cli_in_process


def _write(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return str(path)


GSM8K = {"question": "Tom has 3 bags of 4 apples. How many apples?",
         "answer": "3 bags of 4 is 3*4=<<3*4=12>>12 apples.\n#### 1,012"}
HUMANEVAL = {"prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
             "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


def test_references_are_reduced_to_what_the_reward_checks():
    assert final_answer(GSM8K["answer"]) == "1,012"
    assert final_answer(" 42 ") == "42"
    assert runnable_tests(HUMANEVAL["test"], "add").endswith("\ncheck(add)\n")
    called = "def check(c):\n    assert c(1) == 1\n\ncheck(f)\n"
    assert runnable_tests(called, "f") == called  # already runs: unchanged


def test_chat_plain_and_code_prompts_round_trip(tmp_path, llama_tokenizer_dir):
    from transformers import AutoTokenizer

    math = _write(tmp_path / "gsm8k.jsonl", [GSM8K, {"question": "2+2?", "answer": 4}])
    code = _write(tmp_path / "humaneval.jsonl", [HUMANEVAL])
    out = tmp_path / "out" / "math"
    summary = prepare_prompts([math], str(out), template="chatml", plain_prompts="user",
                              system="Answer briefly.", fields=Fields(prompt="question"),
                              template_kwargs={"enable_thinking": False}, show_progress=False)
    assert (summary.prompts, summary.math, summary.code, summary.chat) == (2, 2, 0, 2)
    assert summary.modes == {"no_think": 2} and not summary.rejected
    prompts = read_prompts(out)
    assert is_prompt_set(out) and len(prompts) == 2
    first = prompts[0]
    assert isinstance(first, PromptRecord) and first.answer == "1,012" and prompts[1].answer == "4"
    expected = load_template("chatml").render(
        [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": GSM8K["question"]}],
        add_generation_prompt=True).text
    assert first.text == expected and first.text.endswith("<|im_start|>assistant\n")
    tokenizer = AutoTokenizer.from_pretrained(prompts.tokenizer_dir)
    assert tokenizer.decode(first.prompt_ids) == expected
    assert summary.stop_ids == [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert [r.where for r in prompts] == [f"{math}:1", f"{math}:2"]

    out_code = tmp_path / "out" / "code"
    summary = prepare_prompts([code], str(out_code), template="chatml", show_progress=False)
    record = read_prompts(out_code)[-1]
    assert (summary.code, summary.chat, record.chat, record.mode) == (1, 0, False, None)
    assert record.text == HUMANEVAL["prompt"] and record.entry_point == "add"
    assert record.tests.endswith("check(add)\n") and record.answer is None
    assert tokenizer.decode(record.prompt_ids, skip_special_tokens=True) == HUMANEVAL["prompt"]


def test_bad_records_are_counted_by_name_and_nothing_half_written(tmp_path, llama_tokenizer_dir):
    path = _write(tmp_path / "in.jsonl", [
        {"prompt": [{"role": "user", "content": "What is 1 + 1?"}], "answer": "2"},
        {"question": "no prompt field", "answer": "1"},
        {"prompt": "no reference"},
        {"prompt": [{"role": "wizard", "content": "x"}], "answer": "1"},
        {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
         "answer": "1"},
        {"prompt": "   ", "answer": "1"},
        {"prompt": "def f():\n", "test": "assert f() == 1"},
        {"prompt": "x", "answer": ["a list"]},
        "{not json",
    ])
    out = tmp_path / "out" / "p"
    summary = prepare_prompts([path], str(out), template="smollm3", show_progress=False)
    assert summary.prompts == 1 and summary.modes == {"think": 1}  # SmolLM3's default mode
    assert summary.rejected == {"missing_prompt": 1, "missing_answer": 1, "unknown_role": 1,
                                "prompt_ends_with_assistant": 1, "empty_prompt": 1,
                                "missing_entry_point": 1, "malformed_answer": 1, "malformed_json": 1}
    assert summary.rejected_examples["missing_answer"] == f"{path}:3"
    assert "  left out: missing_answer: 1 (first at " + f"{path}:3)" in summary.lines()
    with pytest.raises(OutputExists):
        prepare_prompts([path], str(out), show_progress=False)
    # Too long, all of them: one error, and neither the old set nor .partial files are touched.
    before = sorted(p.name for p in out.parent.iterdir())
    with pytest.raises(ConfigError, match=r"no usable prompt in the inputs \(.*too_long=1"):
        prepare_prompts([path], str(out), max_length=5, overwrite=True, show_progress=False)
    assert sorted(p.name for p in out.parent.iterdir()) == before and is_prompt_set(out)
    # A set whose description is missing (a killed run) is not a prompt set.
    (tmp_path / "out" / "p.prompts.json").unlink()
    assert not is_prompt_set(out)
    with pytest.raises(ConfigError, match="not a prompt set"):
        read_prompts(out)


def test_cli_on_the_arithmetic_prompts(tmp_path):
    source = write_arithmetic_prompts(tmp_path / "arith.jsonl", count=6, seed=3)
    assert [json.loads(line)["answer"] for line in source.read_text().splitlines()] == [
        str(a + b) for a, b in arithmetic_pairs(6, 3)]
    proc = cli_in_process("prepare-prompts", "--input", str(source), "--out", str(tmp_path / "p"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[:3] == [
        f"wrote {tmp_path}/p.prompts.jsonl, {tmp_path}/p.tokenizer/, {tmp_path}/p.prompts.json",
        "  template       smollm3", "  prompts        6 (answers 6, tests 0; chat 6, plain 0)"]
    assert "  modes          no_think 6" in proc.stdout
    bad = cli_in_process("prepare-prompts", "--input", str(source), "--out", str(tmp_path / "q"),
                         "--prompt-key", "question")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "megasmol prepare-prompts: error: prepare-prompts: no usable prompt in the inputs "
        "(missing_prompt=6)")
