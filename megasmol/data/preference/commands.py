"""``megasmol prepare-preferences``: parse, call one function, print."""

from __future__ import annotations

from megasmol.data.prepare_flags import add_output_flags, add_source_flags, add_template_flags


def cmd_prepare_preferences(args) -> int:
    from megasmol.data.preference.prepare import prepare_preferences

    summary = prepare_preferences(args.input, args.out, template=args.template, tokenizer=args.tokenizer,
                                  max_length=args.max_length, on_overflow=args.on_overflow,
                                  split=args.split, overwrite=args.overwrite, show_progress=not args.quiet)
    print("\n".join(summary.lines()))
    if summary.rejected.get("too_long"):
        print(f"  {summary.rejected['too_long']:,} pair(s) have a half over --max-length {args.max_length} "
              "(--on-overflow error): left out; use --on-overflow truncate to keep them with cut completions")
    return 0


def add_preference_parsers(sub) -> None:
    p = sub.add_parser("prepare-preferences",
                       help="render preference pairs (prompt, chosen, rejected) into packed-pair training "
                            "data for DPO / APO (Megatron indexed datasets + completion loss masks)",
                       description="Renders each pair with the chat template and writes it as one "
                                   "document of two sequences, prompt + chosen then prompt + "
                                   "rejected, with a loss mask on the completions (Megatron-Core "
                                   "indexed datasets) and the tokenizer beside them: the data of a "
                                   "run with a preference: section (DPO, APO). Conversations for "
                                   "SFT: prepare-chat.")
    add_source_flags(p, records=" in TRL's preference formats ({prompt, chosen, rejected} as messages "
                                "or strings; or implicit {chosen, rejected} conversations)",
                     writes="PREFIX.bin/.idx, PREFIX_lossmask.bin/.idx, PREFIX.tokenizer/, PREFIX.pref.json")
    add_template_flags(p, note="; plain-string records use no template")
    p.add_argument("--max-length", type=int,
                   help="longest half (prompt + completion + EOS) in tokens")
    p.add_argument("--on-overflow", default="error", choices=["error", "truncate", "drop"],
                   help="a half over --max-length: error (default: the pair is left out, reported as an "
                        "error count), truncate (keep the prompt, cut the completion), drop (left out, "
                        "counted)")
    add_output_flags(p)
    p.set_defaults(func=cmd_prepare_preferences)
