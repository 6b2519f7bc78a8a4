"""``megasmol generate``: greedy continuation of a prompt with a checkpoint's own Megatron-Core
model and the KV-cached decoder (``cached.py``)."""

from __future__ import annotations

from megasmol.utils.argtypes import input_path, positive_int


def cmd_generate(args) -> int:
    from megasmol.ckpt.checkpoint import tokenizer_dir
    from megasmol.config.typed import ConfigError
    from megasmol.decode.cached import greedy_generate
    from megasmol.model.load import load_checkpoint_model, yarn_overrides
    from megasmol.runtime.distributed import shutdown
    from megasmol.tokenizer import load_tokenizer

    source = args.tokenizer or tokenizer_dir(args.checkpoint)
    if source is None:
        raise ConfigError(f"{args.checkpoint}: no tokenizer stored with it; pass --tokenizer DIR")
    tokenizer = load_tokenizer(source)
    try:
        model, spec, _ = load_checkpoint_model(
            args.checkpoint, overrides=yarn_overrides(args.checkpoint, args.yarn_factor))
        prompt_ids = tokenizer(args.prompt, return_tensors="pt").input_ids
        if prompt_ids.max() >= spec.vocab_size:
            raise ConfigError("the tokenizer's ids exceed the model's vocabulary: wrong tokenizer?")
        ids = greedy_generate(model, prompt_ids, args.max_new_tokens, spec.eos_token_id)
    finally:
        shutdown()
    continuation = tokenizer.decode(ids[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    print(f"prompt:       {args.prompt}")
    print(f"continuation: {continuation}")
    if args.show_ids:
        print("token ids:    " + " ".join(str(t) for t in ids[0].tolist()))
    return 0


def add_decode_parsers(sub) -> None:
    p = sub.add_parser(
        "generate", help="greedy decoding with a checkpoint's Megatron model",
        description="Continues --prompt greedily with the checkpoint's Megatron-Core model itself "
                    "(no conversion; KV cache), up to --max-new-tokens or the EOS token, and prints "
                    "the prompt and the continuation.")
    p.add_argument("--checkpoint", required=True, type=input_path("--checkpoint"),
                   help="checkpoint root, iteration directory or run directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--show-ids", action="store_true", help="also print the token ids")
    p.add_argument("--yarn-factor", type=float,
                   help="run with YaRN scaling by this factor over the trained length (e.g. 2)")
    p.set_defaults(func=cmd_generate)
