"""megasmol's SDPA core attention vs Megatron-Core's local attention: time and peak memory.

Forward + backward of the core attention alone (the part that differs), SmolLM3-3B head layout
(16 query heads, 4 KV groups, head dim 128), bf16 on GPU / fp32 on CPU.  Both run in the same
process, so the ratio is what to read on a shared, noisy machine.

    python bench/attention.py --seq 4096 --batch 1          # on a GPU
    python bench/attention.py --seq 1024 --batch 1 --iters 3  # on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def build(backend: str, seq: int):
    from megatron.core.transformer.enums import AttnMaskType

    from megasmol.model.gpt import transformer_config
    from megasmol.model.layer_specs import LAYER_SPECS
    from megasmol.model.spec import load_model_spec

    spec = load_model_spec("smollm3-3b").replace(attention_backend=backend,
                                                  max_position_embeddings=seq)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    config = transformer_config(spec, params_dtype=dtype)
    module_cls = LAYER_SPECS[backend](False).submodules.self_attention.submodules.core_attention
    module = module_cls(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal,
                        attention_type="self")
    return module, spec, dtype


def measure(backend: str, seq: int, batch: int, iters: int) -> dict:
    module, spec, dtype = build(backend, seq)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    d = spec.kv_channels
    q = torch.randn(seq, batch, spec.num_attention_heads, d, device=device, dtype=dtype,
                    requires_grad=True)
    k = torch.randn(seq, batch, spec.num_kv_heads, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)

    def step():
        out = module(q, k, v, None)
        out.float().sum().backward()

    step()  # warm-up (kernel selection)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else None
    return {"backend": backend, "ms": round(seconds * 1e3, 2),
            "peak_extra_mib": None if peak is None else round(peak / 2**20, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    from megasmol.config.parallel import ParallelLayout
    from megasmol.runtime.distributed import init_parallel

    init_parallel(ParallelLayout())
    results = [measure(b, args.seq, args.batch, args.iters) for b in ("local", "sdpa")]
    local, sdpa = results
    summary = {"seq": args.seq, "batch": args.batch,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "results": results, "sdpa_speedup": round(local["ms"] / sdpa["ms"], 2)}
    if sdpa["peak_extra_mib"]:
        summary["memory_ratio_local_over_sdpa"] = round(
            local["peak_extra_mib"] / sdpa["peak_extra_mib"], 2)
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
