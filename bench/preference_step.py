"""A preference step with precomputed reference log-probs vs a live reference forward each step,
and pair-packing efficiency on a realistic length distribution.

    python bench/preference_step.py [--hidden 256] [--layers 4] [--seq-length 1024] [--pairs 64]
                                    [--steps 6] [--rounds 2]

1. Step time: the same model, packed batch and DPO loss, timed two ways, alternating in rounds
   so machine noise hits both alike. ``precomputed`` is megasmol's step: the reference
   log-probs come with the batch (scored once before training). ``live`` adds what TRL does by
   default: a forward pass of a second, frozen copy of the model over the same batch every step.
   The ratio of median step times is the tokens/s speed-up.
2. Packing: pair lengths drawn from a log-normal fitted to chat preference data (median ~1.2k
   tokens per half, long tail to the 24,576 cap), placed by FFD into 24,576-token sequences vs
   one pair per sequence padded to the cap; the share of non-padding tokens.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def packed_batch(args, spec):
    import torch

    from megasmol.data.masking import model_inputs

    rng = random.Random(0)
    s = args.seq_length
    tokens = torch.full((1, s), spec.eos_token_id, dtype=torch.long)
    segments = torch.full((1, s), -1, dtype=torch.long)
    mask = torch.zeros(1, s)
    at, slot = 0, 0
    while at < s - 40:
        prompt = rng.randint(8, 24)
        for half in (0, 1):
            n = min(prompt + rng.randint(8, 24) + 1, s - at)
            tokens[0, at:at + n - 1] = torch.randint(10, spec.vocab_size, (n - 1,))
            segments[0, at:at + n] = 2 * slot + half
            mask[0, at + prompt:at + n - 1] = 1
            at += n
        slot += 1
    batch = {"tokens": tokens, "labels": torch.roll(tokens, -1, 1), "loss_mask": torch.roll(mask, -1, 1),
             "position_ids": torch.arange(s).unsqueeze(0), "segments": torch.roll(segments, -1, 1),
             "ref_logps": torch.zeros(1, s, dtype=torch.float64)}
    return model_inputs(batch, spec.eos_token_id, True, "sbhd"), slot


def step_times(args) -> dict:
    import torch

    from megasmol.config.parallel import ParallelLayout
    from megasmol.config.preference import PreferenceConfig
    from megasmol.model.gpt import build_model
    from megasmol.runtime.distributed import init_parallel
    from megasmol.runtime.pipeline import forward_only_outputs
    from megasmol.train.objectives import PreferenceLoss, document_logps
    from megasmol.train.step import forward_backward
    from tests.specs import tiny_smollm3

    spec = tiny_smollm3(attention_backend="sdpa", hidden_size=args.hidden, ffn_hidden_size=3 * args.hidden,
                        num_layers=args.layers, head_dim=args.hidden // 4)
    init_parallel(ParallelLayout(), spec)
    torch.manual_seed(0)
    model = build_model(spec)
    reference = build_model(spec).eval()  # a second, frozen model (TRL's ref_model)
    reference.load_state_dict(model.state_dict())
    inputs, pairs = packed_batch(args, spec)
    objective = PreferenceLoss(PreferenceConfig(loss_type="sigmoid", beta=0.1))

    def precomputed():
        model.zero_grad()
        forward_backward(model, [inputs], objective=objective)

    def live():
        with torch.no_grad():
            forward_only_outputs(reference, [inputs], document_logps)
        precomputed()

    modes = {"precomputed": precomputed, "live reference": live}
    times = {name: [] for name in modes}
    for fn in modes.values():
        fn()  # warm-up
    for _ in range(args.rounds):
        for name, fn in modes.items():
            for _ in range(args.steps):
                started = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - started)
    return {"pairs": pairs, "tokens": args.seq_length,
            **{name: statistics.median(values) for name, values in times.items()}}


def packing_efficiency(count: int = 20000, cap: int = 24576, seed: int = 0) -> dict:
    import numpy as np

    from megasmol.data.masked.packing import plan_packing

    rng = np.random.default_rng(seed)
    halves = np.clip(rng.lognormal(mean=np.log(1200), sigma=0.9, size=(count, 2)), 64, cap // 2).astype(int)
    lengths = halves.sum(axis=1)
    ffd = plan_packing(lengths, cap, "ffd")
    none = plan_packing(lengths, cap, "none")
    return {"pairs": count, "mean_pair_tokens": float(lengths.mean()), "ffd": ffd.efficiency,
            "ffd_sequences": ffd.num_sequences, "none": none.efficiency, "none_sequences": none.num_sequences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    steps = step_times(args)
    print(f"step on {steps['tokens']} tokens ({steps['pairs']} pairs, hidden {args.hidden}, "
          f"{args.layers} layers): precomputed {steps['precomputed']:.3f}s, live reference "
          f"{steps['live reference']:.3f}s -> {steps['live reference'] / steps['precomputed']:.2f}x tokens/s")
    pack = packing_efficiency()
    print(f"packing {pack['pairs']} pairs (mean {pack['mean_pair_tokens']:.0f} tokens) into 24,576: FFD "
          f"{100 * pack['ffd']:.1f}% non-padding in {pack['ffd_sequences']} sequences; one pair per "
          f"sequence {100 * pack['none']:.1f}% in {pack['none_sequences']} -> "
          f"{pack['none_sequences'] / pack['ffd_sequences']:.1f}x fewer sequences")


if __name__ == "__main__":
    main()
