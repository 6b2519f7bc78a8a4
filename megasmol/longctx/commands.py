"""``megasmol eval passkey``: the command-line side."""

from __future__ import annotations

from pathlib import Path

from megasmol.errors import InputError
from megasmol.utils.argtypes import add_model_choice


def cmd_eval_passkey(args) -> int:
    from tqdm import tqdm

    from megasmol.ckpt.checkpoint import tokenizer_dir
    from megasmol.longctx.passkey import evaluate, hf_generator, megatron_generator, write_outputs
    from megasmol.runtime.distributed import shutdown
    from megasmol.tokenizer import load_tokenizer

    if bool(args.checkpoint) == bool(args.hf):
        raise InputError("give exactly one of --checkpoint or --hf")
    lengths = [_token_count(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    if not lengths or not depths or any(not 0 <= d <= 1 for d in depths):
        raise InputError("--lengths needs token counts (e.g. 1k,4k) and --depths fractions in [0, 1]")
    try:  # the Megatron-Core model's process group ends with the command, as eval tasks' does
        if args.checkpoint:
            generate = megatron_generator(args.checkpoint, args.max_new_tokens, args.yarn_factor)
            tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir(args.checkpoint))
        else:
            generate = hf_generator(args.hf, args.max_new_tokens)
            tokenizer = load_tokenizer(args.tokenizer or args.hf)
        total = len(lengths) * len(depths) * args.trials
        with tqdm(total=total, unit="trial", disable=args.quiet) as bar:
            result = evaluate(generate, tokenizer, lengths, depths, args.trials, args.seed, progress=bar)
    finally:
        shutdown()
    print(result.table())
    label = str(args.checkpoint or args.hf)
    report, png = write_outputs(result, Path(args.out), label)
    from megasmol.utils.fs import shown

    print(f"report: {shown(report)}\nheat map: {shown(png)}")
    return 0


def _token_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise InputError(f"--lengths: {text!r} is not a token count like 4096 or 4k") from None


def add_passkey_parser(evals) -> None:
    """``megasmol eval passkey`` (the ``eval`` command itself lives in megasmol/eval/)."""
    p = evals.add_parser(
        "passkey", help="needle-in-a-haystack retrieval accuracy by length and depth",
        description="Builds prompts of each length with a 5-digit pass key hidden at each depth in "
                    "filler text, decodes greedily and scores only the generated tokens. Writes a "
                    "table, OUT/passkey.json and a heat map OUT/passkey.png.")
    add_model_choice(p)
    p.add_argument("--lengths", default="1k,2k,4k", help="prompt lengths in tokens (default 1k,2k,4k)")
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1",
                   help="needle depths (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--trials", type=int, default=5, help="keys per cell (default 5)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per trial (default 8)")
    p.add_argument("--yarn-factor", type=float,
                   help="run the Megatron model with YaRN scaling by this factor")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="seed for the keys (default 0)")
    p.add_argument("--out", default="runs/passkey", help="output directory (default runs/passkey)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval_passkey)
