"""NeMo-RL's ``token_mult_prob_error`` and the engine check's comparison, on values worked out by
hand (exp(0.1) = 1.1051709181, exp(0.2) = 1.2214027582)."""

import math

import pytest
import torch

from megasmol.rl.logp_agreement import (
    compare_logps,
    mult_prob_error_sum,
    padded,
    token_mult_prob_error,
)

ROLLOUT = torch.tensor([-1.0, -2.0, -0.5, -3.0])
TRAINER = torch.tensor([-1.1, -2.0, -0.3, -9.0], dtype=torch.float64)
MASK = torch.tensor([1.0, 1.0, 1.0, 0.0])  # the last token is not trained: its gap of 6 is left out
BY_HAND = (1.1051709181 + 1.0 + 1.2214027582) / 3  # 1.1088578921


def test_token_mult_prob_error_is_the_mean_of_exp_abs_diff_over_the_trained_tokens():
    assert token_mult_prob_error(ROLLOUT, TRAINER, MASK) == pytest.approx(BY_HAND, abs=1e-7)
    # either way round: the factor between the two probabilities
    assert token_mult_prob_error(TRAINER, ROLLOUT, MASK) == pytest.approx(BY_HAND, abs=1e-7)
    assert token_mult_prob_error(ROLLOUT, ROLLOUT, MASK) == 1.0
    assert math.isnan(token_mult_prob_error(ROLLOUT, TRAINER, torch.zeros(4)))


def test_the_sums_of_parts_give_the_mean_of_the_whole():
    """Micro-batches and ranks add (sum, count) before the one division."""
    first = mult_prob_error_sum(ROLLOUT[:2], TRAINER[:2], MASK[:2])
    second = mult_prob_error_sum(ROLLOUT[2:], TRAINER[2:], MASK[2:])
    assert first[1] == 2 and second[1] == 1
    assert (first[0] + second[0]) / (first[1] + second[1]) == pytest.approx(BY_HAND, abs=1e-7)


def test_compare_logps_gives_the_table_numbers_and_the_verdict():
    reference, mask = padded([[-1.0, -2.0], [-0.5]])
    candidate, same_mask = padded([[-1.1, -2.0], [-0.3]])
    assert torch.equal(mask, same_mask) and mask.tolist() == [[1, 1], [1, 0]]
    result = compare_logps(reference, candidate, mask, threshold=1.11)
    assert result.tokens == 3
    assert result.max_abs_diff == pytest.approx(0.2, abs=1e-12)
    assert result.mean_abs_diff == pytest.approx(0.1, abs=1e-12)
    assert result.token_mult_prob_error == pytest.approx(BY_HAND, abs=1e-7)
    assert result.passed
    # the verdict is on token_mult_prob_error (1.1089 here), not on the largest difference
    assert not compare_logps(reference, candidate, mask, threshold=1.10).passed


def test_compare_logps_fails_with_nothing_compared_and_refuses_mismatched_shapes():
    empty = compare_logps(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), threshold=1.0)
    assert empty.tokens == 0 and not empty.passed
    with pytest.raises(ValueError, match="log-prob shapes differ"):
        compare_logps(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2, 3), threshold=1.0)
