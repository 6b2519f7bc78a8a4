"""Greedy decoding tokens/s with and without the KV cache, at 1k and 4k prompt tokens; then, with
the cache, a batch of prompts of different lengths decoded together against one at a time.

A random ``smollm3-tiny`` (positions extended to 8k) in one process; the paths compared decode the
same tokens (checked), so the ratios are the cache's and the batching's gains. On a GPU, pass
``--spec smollm3-3b``.

    python bench/decode_cache.py --prompts 1024,4096 --new-tokens 32 --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="smollm3-tiny")
    parser.add_argument("--prompts", default="1024,4096")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16,
                        help="prompts decoded together in the second table (0: skip it)")
    parser.add_argument("--batch-prompts", default="200,400",
                        help="their lengths are drawn uniformly from this range")
    args = parser.parse_args()

    from megasmol.decode.cached import generate, greedy_generate
    from megasmol.model.load import single_process_model
    from megasmol.model.spec import load_model_spec

    spec = load_model_spec(args.spec).replace(max_position_embeddings=8192)
    model = single_process_model(spec).eval()
    print(f"{spec.name}, {args.new_tokens} new tokens, torch threads {torch.get_num_threads()}")
    print("| prompt tokens | no cache: tokens/s | KV cache: tokens/s | speed-up |")
    print("|---|---|---|---|")
    for length in (int(x) for x in args.prompts.split(",")):
        prompt = torch.randint(0, 10000, (1, length))
        seconds = {}
        outputs = {}
        for use_cache in (False, True):
            started = time.perf_counter()
            outputs[use_cache] = greedy_generate(model, prompt, args.new_tokens, use_cache=use_cache)
            seconds[use_cache] = time.perf_counter() - started
        assert outputs[True].tolist() == outputs[False].tolist(), "the two paths disagree"
        slow, fast = args.new_tokens / seconds[False], args.new_tokens / seconds[True]
        print(f"| {length} | {slow:.1f} | {fast:.1f} | {fast / slow:.1f}x |")
    if args.batch:
        low, high = (int(x) for x in args.batch_prompts.split(","))
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, 10000, (int(torch.randint(low, high + 1, (1,), generator=gen)),),
                                 generator=gen).tolist() for _ in range(args.batch)]
        started = time.perf_counter()
        alone = [greedy_generate(model, torch.tensor([p]), args.new_tokens)[0, len(p):].tolist()
                 for p in prompts]
        one_by_one = time.perf_counter() - started
        started = time.perf_counter()
        together = [c.tokens for c in generate(model, prompts, args.new_tokens)]
        batched = time.perf_counter() - started
        assert together == alone, "batched decoding disagrees with one prompt at a time"
        tokens = args.new_tokens * len(prompts)
        print(f"\n{len(prompts)} prompts of {low}-{high} tokens, {args.new_tokens} new tokens each, KV cache")
        print("| one prompt at a time: tokens/s | all together: tokens/s | speed-up |")
        print("|---|---|---|")
        print(f"| {tokens / one_by_one:.1f} | {tokens / batched:.1f} | {one_by_one / batched:.1f}x |")


if __name__ == "__main__":
    main()
