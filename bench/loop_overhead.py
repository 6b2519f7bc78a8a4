"""Step time of megasmol's training loop vs a bare Megatron-Core loop, same model and data.

    python bench/loop_overhead.py [--spec smollm3-tiny] [--steps 20] [--rounds 4] [--optim muon]

The bare loop is what a minimal Megatron-Core script does per step: zero the DDP grad buffer,
``forward_backward_func`` over pre-built micro-batches, ``optimizer.step()``. megasmol's loop adds
the data pipeline (sample lookup, document masks, prefetch thread), the LR schedule, the global
loss all-reduce, spike checks, metrics (JSONL, console line) and signal handling. Both run on the
same model and optimizer in one process, alternating in rounds so machine noise hits both
alike; the bare loop gets its batches for free (built before timing). Target: ratio <= 1.05.
``--optim``: the optimizer both loops step (``optim.name``; the default AdamW).
Data: the demo corpus, built in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import yaml

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="smollm3-tiny")
    parser.add_argument("--steps", type=int, default=20, help="steps per loop and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    from megasmol.train.optimizer import OPTIMIZERS

    parser.add_argument("--optim", default="adamw", choices=sorted(OPTIMIZERS),
                        help="optim.name of both loops (default adamw)")
    args = parser.parse_args()

    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megasmol.config.run import load_run_config
    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus
    from megasmol.data.masking import model_inputs
    from megasmol.runtime.pipeline import forward_step
    from megasmol.train.loop import Trainer
    from megasmol.train.objectives import TokenLoss
    from megasmol.train.setup import build_setup

    work = Path(tempfile.mkdtemp(prefix="loopbench-"))
    build_demo_corpus(work / "corpus")
    tokenize_demo_corpus(work / "corpus", show_progress=False)
    total = args.steps * (2 * args.rounds + 1)  # warm-up, then bare and ours alternating
    config_path = work / "run.yaml"
    config_path.write_text(yaml.safe_dump({
        "model": args.spec, "run_dir": str(work / "run"),
        "data": {"recipe": "demo", "root": str(work / "corpus" / "tokens"),
                 "seq_length": args.seq_length, "validation_fraction": 0.0},
        "training": {"train_steps": total, "global_batch_size": args.global_batch,
                     "micro_batch_size": args.micro_batch, "precision": "fp32"},
        "schedule": {"kind": "constant", "lr": 1e-3, "warmup_steps": 0},
        "optim": {"name": args.optim},
        "checkpoint": {"interval": 0, "save_at_end": False, "resume": False},
        "logging": {"interval": 10, "tensorboard": False, "progress": False},
        "eval": {"interval": 0},
    }))
    config = load_run_config(config_path)
    setup = build_setup(config)
    trainer = Trainer(setup)
    forward_backward_func = get_forward_backward_func()
    spec = setup.spec

    def bare(first_step: int) -> float:
        batches = [[model_inputs(mb, spec.eos_token_id, True, setup.mask_format)
                    for mb in setup.batches.micro_batches(step)]
                   for step in range(first_step, first_step + args.steps)]
        started = time.perf_counter()
        for inputs in batches:
            setup.ddp_model.zero_grad_buffer()
            setup.optimizer.zero_grad()
            forward_backward_func(forward_step_func=partial(forward_step, loss_func=TokenLoss()),
                                  data_iterator=iter(inputs),
                                  model=[setup.ddp_model], num_microbatches=len(inputs),
                                  seq_length=args.seq_length, micro_batch_size=args.micro_batch,
                                  forward_only=False)
            setup.optimizer.step()
        return (time.perf_counter() - started) / args.steps

    def ours(first_step: int) -> float:
        trainer.state.step = first_step - 1
        started = time.perf_counter()
        trainer.run_steps(until=first_step + args.steps - 1)
        return (time.perf_counter() - started) / args.steps

    bare(1)  # warm-up: allocator, first-touch of the data
    step, bare_times, our_times = 1 + args.steps, [], []
    for _ in range(args.rounds):
        bare_times.append(bare(step))
        step += args.steps
        our_times.append(ours(step))
        step += args.steps
    trainer.close()
    b, o = statistics.median(bare_times), statistics.median(our_times)
    print(f"\nspec {args.spec}, optim {args.optim}, {args.global_batch} x {args.seq_length} tokens/step, "
          f"{args.steps} steps x {args.rounds} rounds")
    print(f"{'loop':<10} {'median s/step':>14} {'rounds':>40}")
    print(f"{'bare':<10} {b:>14.4f} {' '.join(f'{t:.4f}' for t in bare_times):>40}")
    print(f"{'megasmol':<10} {o:>14.4f} {' '.join(f'{t:.4f}' for t in our_times):>40}")
    print(f"ratio megasmol / bare: {o / b:.3f} (target <= 1.05)")


if __name__ == "__main__":
    main()
