"""Where a built-in generative task has lm-eval's name, it is lm-eval's task: its prompt, target,
stop strings, token budget, answer extraction and exact-match options are read here from
lm-eval's own YAML files (the installed lm-eval, a dev dependency) and compared field by field. A
deliberate variant must take another name."""

from pathlib import Path

import lm_eval
import pytest
import yaml

from megasmol.eval.tasks.registry import load_task

LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks"


class _Loader(yaml.SafeLoader):
    """lm-eval's YAML files name Python functions with ``!function``: kept as their text."""


_Loader.add_constructor("!function", lambda loader, node: f"!function {loader.construct_scalar(node)}")


def _lm_eval(path: str) -> dict:
    return yaml.load((LM_EVAL_TASKS / path).read_text(), Loader=_Loader)


def _default_budget() -> int:
    """lm-eval's token budget for a generate_until task whose YAML sets none (its HF model's)."""
    from lm_eval.models.huggingface import HFLM

    return HFLM.max_gen_toks.fget(None)


CHECKED = [("gsm8k", "gsm8k/gsm8k.yaml"), ("humaneval", "humaneval/humaneval.yaml")]


@pytest.mark.parametrize("name, path", CHECKED)
def test_a_task_named_as_lm_evals_is_lm_evals(name, path):
    theirs = _lm_eval(path)
    spec = load_task(name).spec
    assert theirs["output_type"] == "generate_until" and spec.formulation in ("fg", "code")
    assert spec.context == theirs["doc_to_text"], "prompt"
    assert spec.answer == theirs["doc_to_target"], "target (few-shot examples and the reference)"
    generation = theirs["generation_kwargs"]
    assert spec.until == generation["until"], "stop strings"
    assert spec.max_gen_tokens == generation.get("max_gen_toks", _default_budget()), "token budget"
    assert generation.get("do_sample") is False  # greedy, as megasmol decodes
    assert spec.split == theirs["test_split"]
    if "fewshot_split" in theirs:
        assert spec.fewshot_split == theirs["fewshot_split"]
    if spec.formulation == "fg":
        [flexible] = [f for f in theirs["filter_list"] if f["name"] == "flexible-extract"]
        [regex, take] = flexible["filter"]
        assert (regex["function"], regex["group_select"], take["function"]) == ("regex", -1, "take_first")
        assert spec.answer_pattern == regex["regex_pattern"], "extraction (the last match)"
        [metric] = theirs["metric_list"]
        assert metric["metric"] == "exact_match"
        assert spec.answer_ignore == metric["regexes_to_ignore"], "exact_match's regexes_to_ignore"
        assert spec.ignore_case == metric["ignore_case"] and not metric["ignore_punctuation"]
    else:
        assert spec.entry_point == "{{entry_point}}"
        assert [m["metric"] for m in theirs["metric_list"]] == ["!function utils.pass_at_k"]


def test_every_generative_task_named_as_an_lm_eval_task_is_checked():
    """A new built-in generative task that takes an lm-eval task's name joins the check above."""
    from megasmol.eval.tasks.registry import task_names

    named = {name for name in task_names() if load_task(name).spec.formulation in ("fg", "code")
             and (LM_EVAL_TASKS / name / f"{name}.yaml").exists()}
    assert named == {name for name, _ in CHECKED}
