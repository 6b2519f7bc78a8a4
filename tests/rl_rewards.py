"""Reward functions the RL tests name as ``module:function`` (a user's own rewards)."""


def even_tokens(completions, records, **kwargs):
    """The share of a completion's words (``tN`` in the tests' word-level tokenizer) whose id is
    even: a random model scores about 0.5 with spread inside each group, and the policy can learn
    to raise it within a few steps."""
    rewards = []
    for text in completions:
        words = [w for w in text.split() if w.startswith("t") and w[1:].isdigit()]
        rewards.append(sum(int(w[1:]) % 2 == 0 for w in words) / max(len(words), 1))
    return rewards


def raises(completions, records, **kwargs):
    raise RuntimeError("reward bug")


def nan_reward(completions, records, **kwargs):
    return [float("nan")] * len(completions)


def prompt_parity(completions, records, **kwargs):
    """Depends on the prompt alone: every group's completions get equal rewards (no signal)."""
    return [float(record.prompt_ids[0] % 2) for record in records]


def even_tokens_on_even_prompts(completions, records, **kwargs):
    """``even_tokens`` for prompts whose first id is even; a constant for the others (groups
    without signal, which dynamic sampling drops)."""
    scores = even_tokens(completions, records)
    return [s if r.prompt_ids[0] % 2 == 0 else 0.5 for s, r in zip(scores, records)]
