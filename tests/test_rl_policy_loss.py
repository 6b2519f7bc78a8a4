"""The policy loss's sums add up: splitting a step's completions over micro-batches (or ranks),
or a completion's tokens over context-parallel ranks, gives the same loss, gradients and metrics
as one call on everything (the TRL parity itself: test_grpo_trl.py)."""

import threading

import pytest
import torch

from megasmol.config.rl import LOSS_TYPES, RLConfig
from megasmol.rl.policy_loss import metric_means, policy_loss

LENGTHS = [5, 3, 0, 7, 2, 4]  # completion 2 is fully masked (a truncated completion, masked out)


def _packed(seed: int = 0):
    """Flat tensors of packed completions, each after a 2-token prompt that is not scored."""
    gen = torch.Generator().manual_seed(seed)
    mask, seq_id = [], []
    for s, n in enumerate(LENGTHS):
        mask += [0, 0] + [1] * n
        seq_id += [-1, -1] + [s] * n
    size = len(mask)
    logps = (-torch.rand(size, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    old = logps.detach() + 0.3 * torch.randn(size, generator=gen, dtype=torch.float64)
    ref = logps.detach() + 0.3 * torch.randn(size, generator=gen, dtype=torch.float64)
    per_completion = torch.randn(len(LENGTHS), generator=gen, dtype=torch.float64)
    seq_id = torch.tensor(seq_id)
    advantages = per_completion[seq_id.clamp(min=0)]
    entropies = torch.rand(size, generator=gen, dtype=torch.float64)
    return logps, old, ref, advantages, torch.tensor(mask).bool(), seq_id, entropies


def _config(loss_type, level):
    return RLConfig(loss_type=loss_type, importance_sampling_level=level, beta=0.05,
                    epsilon_high=1.2 if loss_type == "cispo" else 0.28, max_completion_length=8)


def _call(config, logps, old, ref, adv, mask, seq_id, ent, rows, num, **kw):
    return policy_loss(config, logps[rows], adv[rows], mask[rows], seq_id[rows], num,
                       old_logps=old[rows], ref_logps=ref[rows], entropies=ent[rows], **kw)


def _metrics(config, parts):
    sums = {k: sum(p.sums[k].item() for p in parts) for k in parts[0].sums}
    mins = {k: min(p.mins[k].item() for p in parts) for k in parts[0].mins}
    maxs = {k: max(p.maxs[k].item() for p in parts) for k in parts[0].maxs}
    return metric_means(config, sums, mins, maxs)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_micro_batches_add_up(loss_type, level):
    config = _config(loss_type, level)
    logps, old, ref, adv, mask, seq_id, ent = _packed()
    everything = torch.arange(len(mask))
    whole = _call(config, logps, old, ref, adv, mask, seq_id, ent, everything, len(LENGTHS))
    (whole.loss_sum / whole.count).backward()
    expected_grad, logps.grad = logps.grad.clone(), None

    # Completions 0-2 in one micro-batch, 3-5 in another (ids renumbered per micro-batch).
    cut = sum(2 + n for n in LENGTHS[:3])
    first, second = everything[:cut], everything[cut:]
    seq_second = torch.where(seq_id >= 3, seq_id - 3, -1)
    parts = [_call(config, logps, old, ref, adv, mask, seq_id, ent, first, 3),
             _call(config, logps, old, ref, adv, mask, seq_second, ent, second, 3)]
    count = sum(p.count for p in parts)
    (sum(p.loss_sum for p in parts) / count).backward()

    assert count == whole.count
    assert (whole.count.item() == mask.sum().item()) == (loss_type in ("dapo", "bnpo", "cispo"))
    torch.testing.assert_close(sum(p.loss_sum for p in parts) / count, whole.loss_sum / whole.count)
    torch.testing.assert_close(logps.grad, expected_grad)
    assert logps.grad[~mask].abs().max() == 0 and logps.grad[mask].abs().max() > 0
    assert _metrics(config, parts) == pytest.approx(_metrics(config, [whole]), nan_ok=True)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
def test_context_parallel_halves_add_up(loss_type, level):
    """Each completion's tokens split over two ranks (alternating tokens, as context-parallel
    chunks split documents), ``reduce_segments`` an all-reduce and only rank 0 reporting: the
    same loss, gradients and metrics as one rank holding everything. The two ranks run as
    threads of one process, so one autograd graph holds both and the all-reduce's backward is
    the graph's own."""
    config = _config(loss_type, level)
    logps, old, ref, adv, mask, seq_id, ent = _packed(seed=1)
    everything = torch.arange(len(mask))
    whole = _call(config, logps, old, ref, adv, mask, seq_id, ent, everything, len(LENGTHS))
    (whole.loss_sum / whole.count).backward()
    expected_grad, logps.grad = logps.grad.clone(), None

    barrier, deposits = threading.Barrier(2), [None, None]

    def all_reduce(rank):
        def reduce(tensor):
            deposits[rank] = tensor
            barrier.wait()
            total = deposits[0] + deposits[1]
            barrier.wait()
            return total
        return reduce

    parts, errors = [None, None], []

    def run(rank):
        try:
            parts[rank] = _call(config, logps, old, ref, adv, mask, seq_id, ent, everything[rank::2],
                                len(LENGTHS), reduce_segments=all_reduce(rank), reporting=rank == 0)
        except Exception as exc:  # pragma: no cover - surfaced below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    count = parts[0].count + parts[1].count
    (sum(p.loss_sum for p in parts) / count).backward()
    assert count == whole.count
    torch.testing.assert_close(sum(p.loss_sum for p in parts) / count, whole.loss_sum / whole.count)
    torch.testing.assert_close(logps.grad, expected_grad)
    assert _metrics(config, parts) == pytest.approx(_metrics(config, [whole]), nan_ok=True)


def test_on_policy_and_refusals():
    """num_iterations 1: the weights are 1, nothing is clipped, and the loss's gradient is the
    policy gradient -A grad(logp) (dapo: token mean); beta > 0 without reference log-probs is a
    clear error."""
    logps, _, _, adv, mask, seq_id, _ = _packed(seed=2)
    config = RLConfig(loss_type="dapo")
    out = policy_loss(config, logps, adv, mask, seq_id, len(LENGTHS))
    (out.loss_sum / out.count).backward()
    torch.testing.assert_close(logps.grad, -adv * mask / mask.sum())
    means = _metrics(config, [out])
    assert means == {"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.0, "clip_ratio/region_mean": 0.0,
                     "clip_ratio/low_min": 0.0, "clip_ratio/high_max": 0.0}
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(RLConfig(beta=0.1), logps, adv, mask, seq_id, len(LENGTHS))
