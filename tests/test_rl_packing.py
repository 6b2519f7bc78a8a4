"""RL's prompt order, sampling seeds and completion packing (no model needed)."""

from __future__ import annotations

import pytest
import torch

from megasmol.rl.order import completion_seed, refill_prompts, step_prompts
from megasmol.rl.pack import PackedCompletion, pack_rows

EOD = 2


def test_prompt_stream_visits_every_prompt_once_per_epoch_in_a_new_order():
    n, per_step = 10, 4
    stream = [i for step in range(1, 6) for i in step_prompts(step, per_step, n, seed=3)]
    first, second = stream[:n], stream[n:2 * n]
    assert sorted(first) == list(range(n)) and sorted(second) == list(range(n))
    assert first != second
    assert step_prompts(2, per_step, n, seed=3) == stream[4:8]  # a pure function of the step
    assert step_prompts(2, per_step, n, seed=4) != stream[4:8]
    assert refill_prompts(5, 1, 3, n, seed=3) == refill_prompts(5, 1, 3, n, seed=3)
    assert refill_prompts(5, 1, 3, n, seed=3) != refill_prompts(5, 2, 3, n, seed=3)


def test_completion_seeds_are_distinct_per_step_prompt_and_generation():
    seeds = {completion_seed(1, step, 0, k, j) for step in (1, 2) for k in range(4) for j in range(4)}
    assert len(seeds) == 32
    assert completion_seed(1, 2, 0, 3, 1) == completion_seed(1, 2, 0, 3, 1)
    assert completion_seed(1, 2, 1, 3, 1) != completion_seed(1, 2, 0, 3, 1)  # a refill's stream


def _items():
    return [PackedCompletion([5, 6, 7], [8, 9, EOD], [-0.1, -0.2, -0.3], 1.5, entropies=[2.0, 1.5, 0.5]),
            PackedCompletion([5, 6], [3], [-0.5], -1.0, entropies=[3.0]),     # cut short: EOS added
            PackedCompletion([4], [1, 1, 1, 1], [-1.0] * 4, 0.5, trained=False, entropies=[9.0] * 4)]


def test_each_completion_is_one_document_with_the_loss_on_its_tokens_only():
    micro = pack_rows(_items(), seq_length=8, eod=EOD, rows_per_micro=2)
    rows = {key: torch.cat([mb[key] for mb in micro]) for key in micro[0]}
    assert all(mb["tokens"].shape == (2, 8) for mb in micro)
    for index, item in enumerate(_items()):
        at = rows["segments"] == index
        assert rows["labels"][at].tolist() == item.completion  # every completion token, once
        expected = torch.tensor(item.rollout_logps, dtype=torch.float64)
        assert torch.allclose(rows["rollout_logps"][at], expected)
        assert rows["rollout_entropies"][at].tolist() == item.entropies
        assert set(rows["advantages"][at].tolist()) == {item.advantage}
        assert rows["loss_mask"][at].tolist() == [float(item.trained)] * len(item.completion)
    assert rows["loss_mask"][rows["segments"] < 0].sum() == 0  # prompts, added EOS, padding
    # the completion cut short is closed by an EOS that is not one of its tokens
    row = next(r for r in range(rows["tokens"].shape[0]) if 3 in rows["tokens"][r].tolist())
    at = rows["tokens"][row].tolist().index(3)
    assert rows["labels"][row, at] == EOD and rows["segments"][row, at] == -1
    # positions restart at each document
    first_row = rows["position_ids"][0].tolist()
    assert first_row[:6] == list(range(6))


def test_a_rank_without_completions_gets_one_micro_batch_without_loss():
    [micro] = pack_rows([], seq_length=8, eod=EOD, rows_per_micro=2, at_least_one=True)
    assert micro["tokens"].shape == (2, 8) and micro["loss_mask"].sum() == 0


def test_a_document_longer_than_a_row_is_refused():
    with pytest.raises(ValueError, match="completion 0: prompt and completion take 10 tokens"):
        pack_rows([PackedCompletion([1] * 5, [1] * 4, [0.0] * 4, 0.0)], seq_length=8, eod=EOD)


def test_the_entropy_metric_is_the_mean_over_the_trained_completion_tokens(megatron_runtime):
    """TRL's ``entropy``: the decoder's per-token entropies averaged over the tokens the loss
    covers (a completion masked out of the loss, as ``mask_truncated_completions`` does, left out),
    reported in a rollout batch's first update only."""
    from megasmol.config.rl import RLConfig
    from megasmol.data.masking import model_inputs
    from megasmol.train.objectives.rl import PolicyLoss

    config = RLConfig(num_generations=2, max_completion_length=4)
    config.validate()
    loss = PolicyLoss(config)
    micro = pack_rows(_items(), seq_length=8, eod=EOD, rows_per_micro=2)
    loss.set_rollout({"time/generation_s": 1.0})
    sums = None
    for mb in micro:
        inputs = model_inputs(mb, EOD, document_masking=True, mask_format="dense")
        output = -inputs.rollout_logps.float()  # the trainer's per-token loss: -log-prob
        _, _, report = loss(inputs, output)
        sums = report["metrics"] if sums is None else sums + report["metrics"]
    metrics = loss.means(sums.tolist(), 0.0)
    assert metrics["entropy"] == pytest.approx((2.0 + 1.5 + 0.5 + 3.0) / 4)
    # a later update of the same rollout batch: other weights, so no entropy (nor on-policy check)
    loss.set_rollout({"reward": 0.5})
    later = [{k: v for k, v in mb.items() if not k.startswith("rollout_")} for mb in micro]
    sums = None
    for mb in later:
        _, _, report = loss(model_inputs(mb, EOD, document_masking=True, mask_format="dense"),
                            torch.zeros(mb["tokens"].shape))
        sums = report["metrics"] if sums is None else sums + report["metrics"]
    assert "entropy" not in loss.means(sums.tolist(), 0.0)
