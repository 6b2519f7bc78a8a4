"""The RL demo's task (``megasmol demo --rl``): the answer-form reward its shipped config names, the
prompt space it draws from (train and held-out questions disjoint) and its pass rule's noise bound.
The demo's run itself is not part of the suite (minutes); these are its parts."""

from pathlib import Path

import yaml

from megasmol.chat.rl_demo import GRPO_CONFIG, rose_beyond_noise
from megasmol.config.rewards import RewardsConfig
from megasmol.config.typed import from_dict
from megasmol.data.chat.synthetic import in_answer_form, split_arithmetic
from megasmol.data.prompts import PromptRecord
from megasmol.rl.rewards import build_rewards

REPLIES = {
    "37 + 52 = 89.": 1.0,            # the form, the right sum
    "37 + 52 = 12.": 1.0,            # the form, a wrong sum: the form is what is rewarded
    "8 + 1 = 3.\n": 1.0,             # other operands: still the form
    "8 +    9.": 0.0,                # the SFT model's broken form (the last number only)
    "      3.": 0.0,
    "37 + 52 = 89. 37 + 52 = 89.": 0.0,  # more than the one answer
    "37 + 52 = 89": 0.0,             # no final period
    "The answer is 89.": 0.0,
    "": 0.0,
}


def test_the_shipped_config_rewards_the_whole_answer_form():
    """The reward ``examples/tiny/grpo.yaml`` names, built as a run builds it, scores the form of the
    whole reply and nothing else."""
    section = yaml.safe_load(Path(GRPO_CONFIG).read_text())["rewards"]
    rewards = build_rewards(from_dict(RewardsConfig, section, "rewards"))
    try:
        replies = list(REPLIES)
        record = PromptRecord([1, 2], "What is 37 + 52?", "89", None, None, "no_think", True, "in.jsonl:1")
        result = rewards.score([record] * len(replies), replies, [5] * len(replies), [False] * len(replies))
    finally:
        rewards.close()
    assert result.total == [REPLIES[r] for r in replies]
    assert [in_answer_form(r) for r in replies] == [REPLIES[r] == 1.0 for r in replies]


def test_the_prompt_space_is_large_and_the_held_out_questions_are_never_trained_on():
    train, held_out = split_arithmetic(2000, 200, seed=11, high=99)
    assert len(set(train)) == 2000 and len(set(held_out)) == 200
    assert not set(train) & set(held_out)
    assert max(max(pair) for pair in train + held_out) == 99  # two-digit operands drawn too


def test_the_pass_rule_wants_more_than_the_noise_of_the_held_out_size():
    assert rose_beyond_noise(0.38, 1.0, 200)
    assert rose_beyond_noise(0.40, 0.55, 200)      # 15 points on 200 questions: > 2 standard errors
    assert not rose_beyond_noise(0.40, 0.45, 200)  # 5 points: inside the noise
    assert not rose_beyond_noise(0.27, 0.37, 30)   # the old demo's 30 questions: 10 points is noise
    assert not rose_beyond_noise(0.5, 0.5, 200) and not rose_beyond_noise(0.0, 0.0, 200)
    assert not rose_beyond_noise(0.6, 0.3, 200)
