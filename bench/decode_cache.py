"""Greedy decoding tokens/s with and without the KV cache, at 1k and 4k prompt tokens.

A random ``smollm3-tiny`` (positions extended to 8k) in one process; both paths decode the same
tokens (checked), so the ratio is the cache's gain. On a GPU, pass ``--spec smollm3-3b``.

    python bench/decode_cache.py --prompts 1024,4096 --new-tokens 32
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
    args = parser.parse_args()

    from megasmol.generate import greedy_generate
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


if __name__ == "__main__":
    main()
