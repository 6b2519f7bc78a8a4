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


# ---- the policy loss ------------------------------------------------------------------------

from megasmol.config.rl import RLConfig  # noqa: E402
from megasmol.rl.policy_loss import metric_means, policy_loss  # noqa: E402

PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
NUM_GENERATIONS, MAX_COMPLETION, TEMPERATURE = 2, 6, 0.7


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """A tiny random model saved once: TRL loads the policy (and, with beta > 0, its reference)
    from the path, as it would from a hub id; megasmol's side loads the same weights."""
    path = tmp_path_factory.mktemp("grpo-model") / "tiny"
    tiny_model(seed=1).save_pretrained(path)
    return path


def _batch(seed: int):
    """Prompts (left-padded, TRL's layout), completions of different lengths (right-padded; one
    ends at EOS), rewards -> advantages, and noise for the old and reference log-probs."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [p for p in PROMPTS for _ in range(NUM_GENERATIONS)]
    lengths = [6, 2, 5, 6, 1, 4]
    completions = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    completions[1][-1] = EOS
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, -1.0])
    advantages = group_advantages(rewards, NUM_GENERATIONS, "group").advantages
    width_p, width_c = max(map(len, prompts)), MAX_COMPLETION
    prompt_ids = torch.tensor([[PAD] * (width_p - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width_p - len(p)) + [1] * len(p) for p in prompts])
    completion_ids = torch.tensor([c + [PAD] * (width_c - len(c)) for c in completions])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (width_c - len(c)) for c in completions])
    old_noise = (0.4 * torch.randn(len(prompts), width_c, generator=gen)  # per token, and a shift
                 + 0.4 * torch.randn(len(prompts), 1, generator=gen))    # per completion (GSPO)
    ref_noise = 0.3 * torch.randn(len(prompts), width_c, generator=gen)
    return dict(prompts=prompts, completions=completions, advantages=advantages,
                prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                completion_mask=completion_mask, old_noise=old_noise, ref_noise=ref_noise)


def _our_logps(model, batch):
    """A plain forward per completion (prompt + completion, no padding): log_softmax(logits / T)
    of each next token and the entropy, packed flat with the prompt tokens unscored."""
    logps, entropies, mask, seq_id, rows = [], [], [], [], []
    for row, (prompt, completion) in enumerate(zip(batch["prompts"], batch["completions"])):
        ids = torch.tensor([prompt + completion])
        logits = model(ids).logits[0, :-1] / TEMPERATURE
        log_probs = torch.log_softmax(logits, -1)
        logps.append(log_probs.gather(1, ids[0, 1:, None])[:, 0])
        entropies.append(-(log_probs.exp() * log_probs).sum(-1).detach())
        scored = [0] * (len(prompt) - 1) + [1] * len(completion)
        mask.append(torch.tensor(scored))
        seq_id.append(torch.tensor([row if s else -1 for s in scored]))
        rows.append(torch.tensor([row] * len(scored)))
    return (torch.cat(logps), torch.cat(entropies), torch.cat(mask).bool(), torch.cat(seq_id),
            torch.cat(rows))


def _flat(padded: torch.Tensor, batch, seq_mask, rows) -> torch.Tensor:
    """A [completions, max_completion] tensor laid out as the flat tokens (0 on prompt tokens)."""
    out = torch.zeros(seq_mask.shape, dtype=padded.dtype)
    position = 0
    for row, (prompt, completion) in enumerate(zip(batch["prompts"], batch["completions"])):
        start = position + len(prompt) - 1
        out[start:start + len(completion)] = padded[row, :len(completion)]
        position += len(prompt) + len(completion) - 1
    return out


CASES = [  # (loss_type, importance_sampling_level, extra config, off-policy old log-probs)
    *[(loss, level, {"beta": 0.04}, True)
      for loss in ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo") for level in ("token", "sequence")],
    ("grpo", "token", {}, False),
    ("dapo", "token", {"epsilon_high": 0.28}, False),
    ("dapo", "token", {"epsilon_high": 0.28, "delta": 1.3}, True),
    ("grpo", "sequence", {"beta": 0.04, "use_bias_correction_kl": False}, True),
    ("cispo", "sequence", {"epsilon_high": 1.1}, True),
    ("sapo", "token", {"sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.2}, True),
]


@pytest.mark.parametrize("loss_type, level, extra, off_policy", CASES,
                         ids=[f"{c[0]}-{c[1]}-{'-'.join(f'{k}={v}' for k, v in c[2].items())}-"
                              f"{'off' if c[3] else 'on'}" for c in CASES])
def test_policy_loss_equals_trl(tokenizer, tmp_path, saved_model, loss_type, level, extra, off_policy):
    """TRL's ``compute_loss`` on the padded batch against :func:`policy_loss` on the same model's
    log-probs packed flat: the same loss, metrics and parameter gradients.

    The model runs in float64, so that the comparison is of the formulas, not of float32
    rounding in sums of terms that nearly cancel. TRL scores tokens with its own fp32 kernel
    (equal to the plain forward's log-softmax to about 1e-7: the test below); both sides read the
    plain forward's log-probs: TRL's ``_compute_loss`` gets them, padded, in place of its kernel's."""
    extra = dict(extra)
    if loss_type == "cispo":
        extra.setdefault("epsilon_high", 1.15)
    config = RLConfig(loss_type=loss_type, importance_sampling_level=level,
                      num_generations=NUM_GENERATIONS, max_completion_length=MAX_COMPLETION,
                      temperature=TEMPERATURE, num_iterations=2 if off_policy else 1, **extra)
    config.validate()
    trainer = trl_trainer(tokenizer, tmp_path, model=str(saved_model), loss_type=loss_type,
                          importance_sampling_level=level, num_generations=NUM_GENERATIONS,
                          per_device_train_batch_size=6, max_completion_length=MAX_COMPLETION,
                          temperature=TEMPERATURE, num_iterations=config.num_iterations,
                          model_init_kwargs={"dtype": torch.float64}, **extra)
    trainer.current_gradient_accumulation_steps = 1
    model = trainer.model.train()
    batch = _batch(seed=7)
    inputs = {k: batch[k] for k in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")}
    inputs["advantages"] = batch["advantages"]
    inputs["num_items_in_batch"] = batch["completion_mask"].sum()
    scored = batch["completion_mask"].bool()

    logps, entropies, mask, seq_id, rows = _our_logps(model, batch)
    padded = logps.new_zeros(scored.shape).masked_scatter(scored, logps[mask])
    padded_entropy = entropies.new_zeros(scored.shape).masked_scatter(scored, entropies[mask])
    trainer._get_per_token_logps_and_entropies = lambda *args, **kwargs: (padded, padded_entropy, None)
    detached = logps.detach()
    old = detached + _flat(batch["old_noise"], batch, mask, rows)
    ref = detached + _flat(batch["ref_noise"], batch, mask, rows)
    if off_policy:
        inputs["old_per_token_logps"] = torch.where(scored, padded.detach() + batch["old_noise"], 0.0)
    if config.beta:
        inputs["ref_per_token_logps"] = torch.where(scored, padded.detach() + batch["ref_noise"], 0.0)
    trl_loss = trainer.compute_loss(model, inputs)
    trl_loss.backward(retain_graph=True)
    trl_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    ours = policy_loss(config, logps, batch["advantages"][rows], mask, seq_id, len(batch["prompts"]),
                       old_logps=old if off_policy else None, ref_logps=ref if config.beta else None,
                       entropies=entropies)
    loss = ours.loss_sum / ours.count
    loss.backward()

    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-6, abs=1e-9)
    logged = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    totals = ({k: v.item() for k, v in ours.sums.items()}, {k: v.item() for k, v in ours.mins.items()},
              {k: v.item() for k, v in ours.maxs.items()})
    mine = metric_means(config, *totals)
    assert set(mine) == set(logged), (sorted(mine), sorted(logged))
    for name, value in logged.items():
        assert mine[name] == pytest.approx(value, rel=1e-6, abs=1e-7), name
    compared = 0
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, trl_grads[name], rtol=1e-5, atol=1e-8, msg=name)
        compared += trl_grads[name].abs().max().item() > 0
    assert compared >= 10
    if off_policy and loss_type not in ("sapo",):  # the noise moves weights past the clip
        clipped = [v for k, v in mine.items() if "clip" in k and not k.endswith("_min")]
        assert max(clipped) > 0, mine


def test_trl_scores_tokens_as_the_plain_forward(tokenizer, tmp_path, saved_model):
    """TRL's fused log-prob kernel and the plain forward's log_softmax(logits / T), packed flat,
    agree on the same model and batch (what the loss test feeds both sides)."""
    trainer = trl_trainer(tokenizer, tmp_path, model=str(saved_model), num_generations=NUM_GENERATIONS,
                          per_device_train_batch_size=6, max_completion_length=MAX_COMPLETION,
                          temperature=TEMPERATURE, model_init_kwargs={"dtype": torch.float32})
    batch = _batch(seed=7)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
            torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1), MAX_COMPLETION,
            compute_entropy=True)
        logps, entropies, mask, _, _ = _our_logps(trainer.model, batch)
    scored = batch["completion_mask"].bool()
    torch.testing.assert_close(trl_logps[scored], logps[mask], rtol=1e-6, atol=2e-6)
    torch.testing.assert_close(trl_entropy[scored], entropies[mask], rtol=1e-6, atol=2e-6)
