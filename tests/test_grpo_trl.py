"""GRPO against the reference implementation, TRL 1.16's ``GRPOTrainer``, on a tiny random
``LlamaForCausalLM`` (no downloads): the advantages and reward metrics its
``_generate_and_score_completions`` computes from the same rewards, and the loss, metrics and
gradients its ``compute_loss`` gives on the same prompts and completions, against
:mod:`megasmol.rl` on the same model's per-token log-probabilities packed flat."""

import pytest
import torch

from megasmol.rl.advantages import group_advantages, reward_function_metrics, zero_std_groups

VOCAB, PAD, EOS = 64, 0, 1


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 3)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    return LlamaForCausalLM(config).float()


def trl_trainer(tokenizer, tmp_path, model=None, reward_funcs=None, **config):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    config.setdefault("num_generations", 4)
    config.setdefault("per_device_train_batch_size", 3 * config["num_generations"])
    args = GRPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to="none", bf16=False,
                      save_strategy="no", logging_steps=1, seed=0, **config)
    prompts = Dataset.from_list([{"prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(3)])
    return GRPOTrainer(model=model or tiny_model(), reward_funcs=reward_funcs or (lambda **_: None),
                       args=args, train_dataset=prompts, processing_class=tokenizer)


# Three groups of four: all equal (zero deviation), spread, and binary with ties.
REWARDS = [0.7, 0.7, 0.7, 0.7, 0.0, 1.0, 0.25, 2.5, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_advantages_equal_trl(tokenizer, tmp_path, scale_rewards):
    """TRL's own code path: its generation, then the given rewards turned into advantages."""
    calls = []

    def accuracy(prompts, completions, **_):
        calls.append(len(completions))
        return REWARDS

    trainer = trl_trainer(tokenizer, tmp_path, reward_funcs=accuracy, scale_rewards=scale_rewards,
                          max_completion_length=3)
    batch = [{"prompt": f"w{i} w{i + 1} w{i + 2}"} for i in range(3) for _ in range(4)]
    theirs = trainer._generate_and_score_completions(batch)
    assert calls == [12]
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}

    ours = group_advantages(torch.tensor(REWARDS, dtype=torch.float32), 4, scale_rewards)
    torch.testing.assert_close(ours.advantages, theirs["advantages"], rtol=1e-6, atol=1e-7)
    for name in ("reward", "reward_std", "frac_reward_zero_std"):
        assert ours.metrics[name] == pytest.approx(logged[name], rel=1e-6), name
    per_function = reward_function_metrics({"accuracy": torch.tensor(REWARDS)})
    for name in ("rewards/accuracy/mean", "rewards/accuracy/std"):
        assert per_function[name] == pytest.approx(logged[name], rel=1e-6), name
    # The first group has no signal in every mode; the others have some.
    assert (ours.advantages[:4] == 0).all() and (ours.advantages[4:] != 0).all()
    expected_zero = {"group": 1 / 3, "none": 1 / 3, "batch": 0.0}[scale_rewards]
    assert ours.metrics["frac_reward_zero_std"] == pytest.approx(expected_zero)


def test_advantages_by_hand():
    ours = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0], dtype=torch.float64), 2, "group")
    spread = 0.5 ** 0.5  # unbiased deviation of {0, 1}
    expected = torch.tensor([-0.5 / (spread + 1e-4), 0.5 / (spread + 1e-4), 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(ours.advantages, expected)
    assert ours.zero_std.tolist() == [False, False, True, True]
    unscaled = group_advantages(torch.tensor([0.0, 1.0, 3.0, 3.0]), 2, "none").advantages
    assert unscaled.tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert zero_std_groups(torch.tensor([0.0, 1.0, 3.0, 3.0]), 2).tolist() == [False, True]
    with pytest.raises(ValueError, match="whole groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="finite"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    nan_skipped = reward_function_metrics({"code": torch.tensor([1.0, float("nan"), 0.0])})
    assert nan_skipped == {"rewards/code/mean": 0.5, "rewards/code/std": pytest.approx(0.5 ** 0.5)}
