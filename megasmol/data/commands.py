"""``megasmol prepare-data``, ``demo-corpus`` and ``data-audit``: plain documents to Megatron-Core
indexed datasets, the embedded demo corpus, and a run config's data checked as training would.
(Chat, preference and prompt data have their own commands in ``chat``, ``preference``, ``prompts``.)"""

from __future__ import annotations

from megasmol.config.run import cli_override
from megasmol.utils.argtypes import input_path, positive_float, positive_int
from megasmol.utils.fs import shown, shown_paths


def cmd_prepare_data(args) -> int:
    from megasmol.data.tokenize import prepare_data

    summary = prepare_data(args.input, args.out, tokenizer=args.tokenizer, text_key=args.text_key,
                           workers=args.workers, dtype=args.dtype, overwrite=args.overwrite,
                           skip_bad_files=args.skip_bad_files, show_progress=not args.quiet)
    print("\n".join(summary.lines()))
    print(f"  stats      {shown(args.out)}.stats.json")
    return 0


def cmd_demo_corpus(args) -> int:
    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus

    manifest = build_demo_corpus(args.out, code_mb=args.code_mb, math_problems=args.math_problems,
                                 seed=args.seed)
    print(f"demo corpus in {shown(args.out)} (Python {manifest['python']}, seed {manifest['seed']})")
    for domain, info in manifest["domains"].items():
        print(f"  {domain:<6} {info['documents']:>7,} documents  {info['characters']:>11,} characters")
    if args.tokenize:
        for domain, summary in tokenize_demo_corpus(args.out, tokenizer=args.tokenizer,
                                                    workers=args.workers, overwrite=True,
                                                    show_progress=not args.quiet).items():
            print(f"  {domain:<6} {summary.tokens:>11,} tokens -> {shown(summary.output_prefix)}")
    return 0


def cmd_data_audit(args) -> int:
    from megasmol.config.run import load_run_config
    from megasmol.data.audit import audit_run

    report = audit_run(load_run_config(args.config, args.set))
    print(shown_paths(report.render()))
    return 0 if report.ok else 1


def add_data_parsers(sub) -> None:
    p = sub.add_parser(
        "prepare-data", help="tokenize JSONL / text / Parquet into a Megatron indexed dataset",
        description="Tokenizes every document (a JSONL field, a text file, a Parquet column), "
                    "appends EOS and writes PREFIX.bin/.idx in Megatron-Core's indexed format (what "
                    "a data recipe's entries name) and PREFIX.stats.json; files are written under "
                    ".partial names and renamed when complete. Conversations: prepare-chat; "
                    "preference pairs: prepare-preferences.")
    p.add_argument("--input", required=True, nargs="+", type=input_path("input", patterns=True),
                   help="files, directories or globs")
    p.add_argument("--out", required=True,
                   help="output prefix: writes PREFIX.bin, PREFIX.idx and PREFIX.stats.json")
    p.add_argument("--tokenizer", help="tokenizer directory or hub id (default: Llama-3.2, SmolLM3's)")
    p.add_argument("--text-key", default="text", help="JSONL field / Parquet column (default text)")
    p.add_argument("--workers", type=int, default=1,
                   help="1 (default): one process, the tokenizer's own threads on all cores; "
                        "N>1: N single-threaded tokenizer processes")
    p.add_argument("--dtype", default="auto", help="auto (default), uint16 or int32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX")
    p.add_argument("--skip-bad-files", action="store_true",
                   help="count and report unreadable files instead of stopping")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser(
        "demo-corpus", help="build the embedded prose/code/math demo corpus",
        description="Writes OUT/prose.jsonl (Python's language reference and standard-library "
                    "docstrings), OUT/code.jsonl (standard-library sources) and OUT/math.jsonl "
                    "(seeded word problems), from what Python ships: nothing is downloaded. With "
                    "--tokenize, also OUT/tokens/{prose,code,math}_text_document.bin/.idx, the "
                    "data of examples/tiny/*.yaml.")
    p.add_argument("--out", default="runs/demo/corpus", help="directory (default runs/demo/corpus)")
    p.add_argument("--tokenize", action="store_true", help="also tokenize it into OUT/tokens/")
    p.add_argument("--tokenizer", help="tokenizer directory (default: Llama-3.2)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--code-mb", type=positive_float, default=3.0,
                   help="standard-library code budget (default 3 MB)")
    p.add_argument("--math-problems", type=positive_int, default=20000, help="word problems (default 20000)")
    p.add_argument("--seed", type=int, default=1234, help="seed for code sampling and problems")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser(
        "data-audit", help="tokens available / drawn / epochs per stage and dataset",
        description="Checks a run config's data as training would before it starts: per stage and "
                    "dataset, the tokens available and drawn and the epochs that implies; errors "
                    "for missing or truncated files, token ids outside the model's vocabulary and "
                    "a wrong EOS. Exit code 1 on any error.")
    p.add_argument("--config", required=True, type=input_path("--config"), help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="override a config field, e.g. training.train_steps=1000 (repeatable)")
    p.set_defaults(func=cmd_data_audit)
