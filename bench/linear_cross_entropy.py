"""Peak memory and time of the output layer + loss, forward and backward: plain vs chunked.

One training step of the output layer and a token-weighted loss (``sum(mask * loss)``, the
pretraining and SFT objective). ``plain`` is what ``training.cross_entropy: plain`` runs: the
output layer's matmul (the ``[tokens, vocab]`` logits), then Megatron-Core's
``vocab_parallel_cross_entropy``. ``chunked`` is ``model/linear_cross_entropy.py``
(``training.cross_entropy: chunked``) as a training step runs it: the mask given as the loss
weights, the gradients made in the forward. ``recompute`` (only when asked for: ``--variants``)
is the chunked path without weights, as the preference and RL objectives run it: the backward
recomputes the logits. Each variant runs once, in a fresh process, from the same inputs
(SmolLM3-3B's hidden size and vocabulary by default; ``--dtype bfloat16``: the hidden states
and the weight in bf16, as SmolLM3 trains, the loss in fp32 in both paths); its peak memory
is the growth of the process's peak RSS (``getrusage`` maxrss) over the forward and backward,
the inputs already allocated, so it includes the weight's gradient (``vocab x hidden``) in all.
``--hidden`` sets the size of the weight and of its gradient, which both paths hold (chunked:
an fp32 accumulator and, in bf16, the bf16 gradient it returns; plain: the gradient in the
weight's dtype), and the matmuls' cost; the logits (``tokens x vocab``), what the chunked
path saves, do not depend on it: a small hidden size makes the bf16 run, slow on a CPU
without bf16 instructions, feasible.
Time: wall-clock and the process's CPU time (user + system, all threads), both for the
forward and backward.
``--ddp``: the weight wrapped in Megatron-Core's DDP as megasmol's training wraps a model, its
fp32 ``main_grad`` allocated and zeroed before the measurement (both paths: DDP preallocates it
whichever path runs): plain's gradient is made, then added to it by DDP's hook; chunked
accumulates into it (``model/linear_cross_entropy.py``) and holds no gradient of its own;
chunked's default chunk is then ``hidden / 2`` positions (``MAIN_GRAD_CHUNK_FRACTION``).
``--masked F``: the loss mask zeroes a random fraction F of the positions (default 0.1); the
chunked path skips the gradient matmuls of masked positions, plain computes them (as zeros).
``--repeats N`` runs the variants N times, alternating (plain, chunked, plain, chunked, ...), and
prints each run and the ratios of the medians.

    python bench/linear_cross_entropy.py --tokens 4096
    python bench/linear_cross_entropy.py --tokens 4096 --dtype bfloat16 --hidden 128
    python bench/linear_cross_entropy.py --tokens 4096 --ddp
    python bench/linear_cross_entropy.py --tokens 4096 --ddp --masked 0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

VARIANT = """
import gc, json, resource, sys, time
import torch
from megatron.core import tensor_parallel
from megasmol.config.parallel import ParallelLayout
from megasmol.model.linear_cross_entropy import output_layer_loss
from megasmol.runtime.distributed import init_parallel

variant, tokens, vocab, hidden = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
chunk_size = max(1, int(sys.argv[5]) // vocab) if int(sys.argv[5]) else None
dtype = getattr(torch, sys.argv[6])
ddp = sys.argv[7] == "ddp"
masked = float(sys.argv[8])
init_parallel(ParallelLayout())
gen = torch.Generator().manual_seed(0)
# Made in their dtype: an fp32 copy cast to bf16 would raise the peak the growth is measured
# from by 4 bytes per weight element (more than the bf16 step holds at a large hidden size).
h = torch.empty(tokens, 1, hidden, dtype=dtype).normal_(generator=gen).requires_grad_()
w = torch.empty(vocab, hidden, dtype=dtype).normal_(std=0.02, generator=gen).requires_grad_()
labels = torch.randint(0, vocab, (1, tokens), generator=gen)
mask = (torch.rand(1, tokens, generator=gen) >= masked).float()  # a loss mask (default: 90% of the labels)
known_scale = None
if ddp:
    # The weight in Megatron-Core's DDP as megasmol's training wraps a model (wrap_ddp: fp32
    # gradient buffers): main_grad allocated and zeroed (its pages resident, as after a first
    # step) before the measurement; plain's gradient is added to it by DDP's hook, chunked's
    # accumulated into it. The schedule's upstream scalar for sum(mask * loss): 1.
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megasmol.train.optimizer import wrap_ddp

    head = torch.nn.Module()
    head.weight = torch.nn.Parameter(w.detach())
    head.config = TransformerConfig(num_layers=1, hidden_size=hidden, num_attention_heads=1,
                                    params_dtype=dtype, calculate_per_token_loss=True)
    module = wrap_ddp(head, distributed_optimizer=False)
    w = head.weight
    module.zero_grad_buffer()
    known_scale = 1.0
gc.collect()
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
cpu = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
before = rss()
start, cpu_start = time.perf_counter(), cpu()
if variant == "plain":
    logits = torch.matmul(h, w.t())  # the output layer: [s, b, v] in the model's dtype
    # Megatron-Core's CE upcasts to fp32 itself (a copy when the logits are bf16).
    loss = tensor_parallel.vocab_parallel_cross_entropy(logits, labels.t()).t()
    del logits
else:
    loss = output_layer_loss(h, w, labels, loss_weights=mask if variant == "chunked" else None,
                             chunk_size=chunk_size, known_scale=known_scale)
(loss * mask).sum().backward()
seconds, cpu_seconds = time.perf_counter() - start, cpu() - cpu_start
peak = rss() - before
grad = w.main_grad if ddp else w.grad
if ddp:
    assert w.grad is None and w.grad_added_to_main_grad == (variant != "plain")
print("RESULT " + json.dumps({"peak_bytes": peak, "seconds": seconds, "cpu_seconds": cpu_seconds,
                              "mean_loss": loss.mean().item(), "grad_norm": grad.float().norm().item()}))
"""


def run(variant: str, tokens: int, vocab: int, hidden: int, chunk_logits: int, dtype: str,
        ddp: bool = False, masked: float = 0.1) -> dict:
    proc = subprocess.run([sys.executable, "-c", VARIANT, variant, str(tokens), str(vocab), str(hidden),
                           str(chunk_logits), dtype, "ddp" if ddp else "-", repr(masked)],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stdout}\n{proc.stderr}")
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--variants", nargs="+", default=["plain", "chunked"],
                        choices=["plain", "chunked", "recompute"])
    parser.add_argument("--chunk-logits", type=int, default=0,
                        help="logits per chunk (default 0: the module's, DEFAULT_CHUNK_LOGITS)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="the hidden states' and the weight's dtype (the loss is fp32 in both paths)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    parser.add_argument("--ddp", action="store_true",
                        help="the weight in Megatron-Core's DDP, as training wraps it: its fp32 main_grad "
                             "allocated before the measurement; plain adds its gradient to it, chunked "
                             "accumulates into it")
    parser.add_argument("--masked", type=float, default=0.1,
                        help="fraction of the positions the loss mask zeroes, drawn at random (default 0.1; "
                             "0: every position weighted, as pretraining without padding)")
    args = parser.parse_args()
    if not 0.0 <= args.masked <= 1.0:
        parser.error(f"--masked must be in [0, 1], got {args.masked}")
    if "plain" not in args.variants:
        parser.error("--variants must include plain (the ratios are to it)")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    runs: dict = {v: [] for v in args.variants}
    for _ in range(args.repeats):
        for v in args.variants:
            runs[v].append(run(v, args.tokens, args.vocab, args.hidden, args.chunk_logits, args.dtype,
                               args.ddp, args.masked))
    logits_bytes = args.tokens * args.vocab * 4
    model_logits = args.tokens * args.vocab * (2 if args.dtype == "bfloat16" else 4)
    print(f"tokens {args.tokens}, vocab {args.vocab}, hidden {args.hidden}, {args.dtype}"
          f"{', under DDP (main_grad)' if args.ddp else ''}, {args.masked:g} of the positions masked: "
          f"logits {logits_bytes / 1e9:.3f} GB in fp32"
          + (f", {model_logits / 1e9:.3f} GB in bf16" if model_logits != logits_bytes else ""))
    print("| variant | peak RSS growth | time (forward + backward) | CPU time | mean loss "
          "| weight grad norm |")
    print("|---|---|---|---|---|---|")
    for name, rs in runs.items():
        for r in rs:
            print(f"| {name} | {r['peak_bytes'] / 1e9:.3f} GB | {r['seconds']:.1f} s "
                  f"| {r['cpu_seconds']:.1f} s | {r['mean_loss']:.6f} | {r['grad_norm']:.6g} |")
    med = {name: {key: median([r[key] for r in rs]) for key in ("peak_bytes", "seconds", "cpu_seconds")}
           for name, rs in runs.items()}
    for name in (v for v in args.variants if v != "plain"):
        saved = med["plain"]["peak_bytes"] - med[name]["peak_bytes"]
        line = f"{name}: peak saved {saved / 1e9:.3f} GB = {saved / logits_bytes:.2f} x the fp32 logits"
        if model_logits != logits_bytes:
            line += f" = {saved / model_logits:.2f} x the bf16 logits"
        print(f"{line}; time {name} / plain: {med[name]['seconds'] / med['plain']['seconds']:.2f} wall, "
              f"{med[name]['cpu_seconds'] / med['plain']['cpu_seconds']:.2f} CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
