"""RL rewards: the math judge agrees with lm-eval's GSM8K filters, the overlong penalty with
TRL's, weights combine as TRL's ``reward_weights``, a user's reward that misbehaves is one line
naming it and the sample, and the code reward gives hostile programs 0 and leaves nothing behind.
"""

import math
import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from megasmol.config.rewards import RewardsConfig, RewardSpec
from megasmol.config.typed import from_dict
from megasmol.data.prompts import PromptRecord
from megasmol.data.prompts.records import final_answer
from megasmol.rl.rewards import RewardError, build_rewards, reward_metrics
from megasmol.rl.rewards.code import CodeReward
from megasmol.rl.rewards.format import FormatReward
from megasmol.rl.rewards.math import STRICT_PATTERN, gsm8k_options, matches
from megasmol.rl.rewards.overlong import soft_overlong_penalty
from megasmol.rl.rewards.registry import BUILTIN

LM_EVAL_GSM8K = Path(__import__("lm_eval").__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml"


def _record(answer=None, tests=None, entry_point=None, mode=None, text="Q", chat=True):
    return PromptRecord([1, 2], text, answer, tests, entry_point, mode, chat, "in.jsonl:1")


def _rewards(**data):
    return build_rewards(from_dict(RewardsConfig, data, "rewards"))


# --- math ------------------------------------------------------------------------------------

GSM8K_ANSWER = "She sold 617 + 617 = <<617+617=1234>>1234 clips.\n#### 1,234"
COMPLETIONS = [
    "617 + 617 = 1234. The answer is 1234.",      # right
    "The answer is $1,234.",                      # reformatted: $, comma, final period
    "So she sold 1234 clips in total.\n#### 1234",  # strict-match's form
    "#### 1,234\nDone.",
    "She sold 1,234 clips; that is 12 dozen-ish.",  # right number, not the last one
    "The answer is 1233.",                        # wrong
    "#### 1235",
    "I do not know.",                             # no number at all
    "-1234",
    "1234.0",                                     # not an exact match for lm-eval either
]


def _lm_eval_verdicts(filter_name: str) -> list[bool]:
    """lm-eval's own gsm8k pipeline: its filter classes with its YAML's settings, then its
    exact_match with the YAML's options, against the full reference."""
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    spec = yaml.safe_load(LM_EVAL_GSM8K.read_text())
    steps = next(f["filter"] for f in spec["filter_list"] if f["name"] == filter_name)
    regex = {k: v for k, v in steps[0].items() if k != "function"}
    filtered = [resps[0] for resps in RegexFilter(**regex).apply([[c] for c in COMPLETIONS], [])]
    options = {k: v for k, v in spec["metric_list"][0].items()
               if k in ("regexes_to_ignore", "ignore_case", "ignore_punctuation")}
    return [bool(exact_match_hf_evaluate([f], [GSM8K_ANSWER], **options)["exact_match"]) for f in filtered]


@pytest.mark.parametrize("mode, filter_name", [("flexible", "flexible-extract"), ("strict", "strict-match")])
def test_the_math_judge_agrees_with_lm_eval_gsm8k(mode, filter_name):
    spec = yaml.safe_load(LM_EVAL_GSM8K.read_text())
    patterns = {f["name"]: f["filter"][0]["regex_pattern"] for f in spec["filter_list"]}
    assert (patterns["flexible-extract"], patterns["strict-match"]) == (gsm8k_options()[0], STRICT_PATTERN)
    ours = [matches(c, final_answer(GSM8K_ANSWER), mode) for c in COMPLETIONS]
    assert ours == _lm_eval_verdicts(filter_name)
    assert any(ours) and not all(ours)  # the cases tell right from wrong


def test_boxed_answers_and_the_reward_on_prompts_without_a_reference():
    assert matches("So \\boxed{1,234}. Checked with 5 other ways.", "1234", "flexible")
    assert matches("x = \\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "flexible")
    assert not matches("\\boxed{12} then 1234", "1234", "flexible")  # the boxed answer counts
    rewards = _rewards(functions=[{"name": "math"}, {"name": "format", "think": "forbidden"}])
    records = [_record(answer="7"), _record(tests="assert f() == 1", entry_point="f")]
    result = rewards.score(records, ["3 + 4 = 7", "<think>"], [5, 1], [False, False])
    assert result.per_reward["math"][0] == 1.0 and math.isnan(result.per_reward["math"][1])
    assert result.total == [2.0, 0.0]


def test_verify_mode_judges_symbolic_answers():
    pytest.importorskip("math_verify")
    with _rewards(functions=[{"name": "math", "mode": "verify", "workers": 1}]) as rewards:
        result = rewards.score([_record(answer="\\frac{1}{2}")] * 2, ["It is $0.5$.", "It is $2$."],
                               [4, 4], [False, False])
    assert result.per_reward["math"] == [1.0, 0.0]


# --- format, overlong, weights ---------------------------------------------------------------

def test_format_reward():
    completions = ["<think>\nadd them\n</think>\n7", "7", "<think>unclosed 7", "<think></think>",
                   "7 </think>"]
    records = [_record(mode="think"), _record(mode="no_think")] + [_record(mode="think")] * 3
    score = {think: FormatReward(RewardSpec("format", think=think)).score(completions, records)
             for think in ("required", "forbidden", "per_mode")}
    assert score["required"] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert score["forbidden"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert score["per_mode"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(RewardError, match=r"^reward format \(think: per_mode\): sample 0's prompt has "
                                          r"no reasoning mode .*in\.jsonl:1"):
        FormatReward(RewardSpec("format", think="per_mode")).score(["7"], [_record()])


@pytest.mark.parametrize("l_max, l_cache", [(100, 20), (50, 0), (10, 10), (4096, 1024)])
def test_the_overlong_penalty_is_trls(l_max, l_cache):
    from trl.rewards import get_soft_overlong_punishment

    lengths = sorted({0, 1, l_max - l_cache - 1, l_max - l_cache, l_max - l_cache + 1, l_max - 1,
                      l_max, l_max + 1, *range(0, l_max + 40, max(1, l_max // 37))} - {-1})
    trl = get_soft_overlong_punishment(l_max, l_cache)([[0] * n for n in lengths])
    assert [soft_overlong_penalty(n, l_max, l_cache) for n in lengths] == trl
    assert min(trl) == -1.0


def test_weights_the_overlong_penalty_per_mode_and_the_metrics_as_trl():
    import torch
    from trl.trainer.utils import nanstd

    rewards = _rewards(functions=[{"name": "math", "weight": 2.0},
                                  {"name": "format", "think": "forbidden", "weight": 0.5}],
                       overlong={"l_max": 10, "l_cache": 4, "think": {"l_max": 100, "l_cache": 10},
                                 "weight": 0.25},
                       mask_truncated_completions=True)
    records = [_record(answer="3", mode="no_think"), _record(answer="4", mode="think"),
               _record(tests="pass", entry_point="f", mode="no_think"), _record(answer="5")]
    completions = ["1 + 2 = 3", "<think>x</think> 5", "def f(): pass", "5"]
    lengths, truncated = [8, 95, 12, 3], [False, False, True, False]
    assert rewards.names == ["math", "format", "overlong"]
    result = rewards.score(records, completions, lengths, truncated)
    overlong = [soft_overlong_penalty(8, 10, 4), soft_overlong_penalty(95, 100, 10), -1.0, 0.0]
    assert result.per_reward["overlong"] == overlong
    expected = [2 * 1 + 0.5 * 1, 2 * 0 + 0.5 * 0, 0.5 * 1, 2 * 1 + 0.5 * 1]
    assert result.total == pytest.approx([e + 0.25 * o for e, o in zip(expected, overlong)])
    assert result.keep == [True, True, False, True]
    metrics = result.metrics()
    for name, values in result.per_reward.items():
        column = torch.tensor(values)
        assert metrics[f"rewards/{name}/mean"] == pytest.approx(torch.nanmean(column).item())
        assert metrics[f"rewards/{name}/std"] == pytest.approx(nanstd(column).item())
    assert math.isnan(reward_metrics({"x": [1.0]})["rewards/x/std"])  # as TRL: NaN below two values


# --- a user's reward -------------------------------------------------------------------------

USER_MODULE = """
import math

def length(completions, records, scale=1.0):
    return [scale * len(c) for c in completions]

def raises(completions, records):
    raise ValueError("no judge reachable")

def nan_second(completions, records):
    return [1.0, math.nan] + [0.0] * (len(completions) - 2)

def none_first(completions, records):
    return [None] * len(completions)

def too_few(completions, records):
    return [1.0]

def text(completions, records):
    return ["1"] * len(completions)
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards_mod"


def test_a_users_reward_is_called_with_completions_and_records(user_module):
    rewards = _rewards(functions=[{"name": f"{user_module}:length", "kwargs": {"scale": 0.5},
                                   "weight": 2.0}])
    result = rewards.score([_record(answer="1")] * 2, ["abcd", "ab"], [4, 2], [False, False])
    assert result.per_reward == {"length": [2.0, 1.0]} and result.total == [4.0, 2.0]


@pytest.mark.parametrize("function, message", [
    ("raises", r"^reward raises \(my_rewards_mod:raises\) raised ValueError: no judge reachable$"),
    ("nan_second", r"^reward nan_second \(my_rewards_mod:nan_second\) returned nan for sample 1 "
                   r"\(from in\.jsonl:1\); expected a finite number$"),
    ("none_first", r"returned None for sample 0 "),
    ("too_few", r"^reward too_few \(my_rewards_mod:too_few\) returned 1 value\(s\) for 3 completion\(s\)$"),
    ("text", r"returned '1' for sample 0 "),
])
def test_a_users_reward_that_misbehaves_is_one_line_naming_it_and_the_sample(user_module, function,
                                                                              message):
    rewards = _rewards(functions=[{"name": f"{user_module}:{function}"}])
    with pytest.raises(RewardError, match=message):
        rewards.score([_record(answer="1")] * 3, ["a", "b", "c"], [1, 1, 1], [False] * 3)


def test_a_sample_no_reward_applies_to_is_refused():
    rewards = _rewards(functions=[{"name": "math"}])
    with pytest.raises(RewardError, match=r"^sample 1 \(from in\.jsonl:1\): none of the rewards \(math\) "
                                          r"applies to its prompt \(answer: False, tests: True\)"):
        rewards.score([_record(answer="1"), _record(tests="pass", entry_point="f")], ["1", "x"],
                      [1, 1], [False, False])


def test_the_registry_implements_every_name_the_config_accepts():
    from megasmol.config.rewards import BUILTIN_OPTIONS

    assert set(BUILTIN) == set(BUILTIN_OPTIONS)


# --- code ------------------------------------------------------------------------------------

PROMPT = 'def add(a, b):\n    """The sum of a and b."""\n'
TESTS = ("def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n\n"
         "check(add)\n")


@pytest.fixture
def sandbox_tmp(tmp_path, monkeypatch):
    """The sandbox's directories under this test's folder, to see that none is left behind."""
    box = tmp_path / "box"
    box.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(box))
    yield box
    assert list(box.iterdir()) == []


def _children() -> list[int]:
    """Processes whose parent is this one (the sandbox's, if any were left running)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                status = Path(f"/proc/{entry.name}/status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{os.getpid()}\n" in status:
                found.append(int(entry.name))
    return found


def test_hostile_completions_score_zero_and_leave_nothing_behind(sandbox_tmp, tmp_path):
    outside = tmp_path / "outside.txt"
    body = {
        "right": "    return a + b\n",
        "wrong": "    return a - b\n",
        "fork bomb": "    import os\n    while True:\n        os.fork()\n",
        "network": "    import socket\n    socket.create_connection(('127.0.0.1', 9), timeout=1)\n"
                   "    return a + b\n",
        "file outside": f"    open({str(outside)!r}, 'w').write('x')\n    return a + b\n",
        "memory bomb": "    x = bytearray(8 << 30)\n    return a + b\n",
        "time bomb": "    while True:\n        pass\n",
        "exit(0) before the tests": "    return a + b\nimport sys\nsys.exit(0)\n",
        "os._exit(0) before the tests": "    return a + b\nimport os\nos._exit(0)\n",
        "kill the parent": "    import os\n    os.kill(os.getppid(), 9)\n    return a + b\n",
        "always equal": "    class Yes(int):\n        def __eq__(self, other):\n            return True\n"
                        "    return Yes(0)\n",
        "builtins patched": "    return 0\nimport builtins\n"
                            "builtins.AssertionError = type('AssertionError', (Exception,), {})\n",
    }
    chat = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
    rewards = _rewards(functions=[{"name": "code", "timeout_s": 1.0, "workers": 2, "memory_mb": 512}])
    records = [_record(tests=TESTS, entry_point="add", text=PROMPT, chat=False)] * len(body)
    records.append(_record(tests=TESTS, entry_point="add", text="<|im_start|>user\nWrite add.", chat=True))
    before = set(_children())  # other tests' session servers (moto) may be this worker's children
    started = time.monotonic()
    result = rewards.score(records, [*body.values(), chat], [10] * len(records), [False] * len(records))
    assert time.monotonic() - started < 60
    scores = dict(zip([*body, "chat"], result.per_reward["code"]))
    assert scores == {name: float(name in ("right", "chat")) for name in scores}
    assert not outside.exists() and set(_children()) <= before and result.notes == []


def test_the_batch_budget_scores_programs_not_started_in_time_zero(sandbox_tmp):
    reward = CodeReward(RewardSpec("code", timeout_s=1.0, workers=1, batch_budget_s=0.5))
    record = _record(tests=TESTS, entry_point="add", text=PROMPT, chat=False)
    values = reward.score(["    while True:\n        pass\n", "    return a + b\n", "    return a + b\n"],
                          [record] * 3)
    assert values == [0.0, 0.0, 0.0]
    assert reward.notes() == ["reward code: 2 program(s) not run within batch_budget_s 0.5 s: scored 0 "
                              "(raise it, or workers)"]


def test_the_rl_demos_form_reward_wants_the_questions_own_operands():
    """A form reward for ``megasmol demo --rl``'s prompts: the answer form with the asked A and B (the sum
    right or not), added to the math reward by weight."""
    text = ("<|im_start|>system\nYou are a calculator.<|im_end|>\n<|im_start|>user\nWhat is 3 + 4?"
            "<|im_end|>\n<|im_start|>assistant\n")
    rewards = _rewards(functions=[{"name": "math"},
                                  {"name": "megasmol.data.prompts.synthetic:restates_question",
                                   "weight": 0.5}])
    replies = ["3 + 4 = 7.", "3 + 4 = 8.", "4 + 3 = 7.", "7", "3 + 4 is 7"]
    result = rewards.score([_record(answer="7", text=text)] * 5, replies, [5] * 5, [False] * 5)
    assert result.per_reward["restates_question"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert result.total == [1.5, 0.5, 1.0, 1.0, 1.0]
