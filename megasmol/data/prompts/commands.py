"""``megasmol prepare-prompts``: parse, call one function, print."""

from __future__ import annotations

import argparse

import yaml

from megasmol.data.prepare_flags import add_output_flags, add_source_flags, add_template_flags
from megasmol.utils.argtypes import positive_int


def template_kwarg(raw: str) -> tuple[str, object]:
    """``KEY=VALUE``, the value read as YAML (``enable_thinking=false`` is the boolean)."""
    key, sep, value = raw.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {raw!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{raw!r}: the value is not a YAML scalar") from None


def cmd_prepare_prompts(args) -> int:
    from megasmol.data.prompts.prepare import prepare_prompts
    from megasmol.data.prompts.records import Fields
    from megasmol.utils.fs import shown_paths

    fields = Fields(args.prompt_key, args.answer_key, args.tests_key, args.entry_point_key)
    summary = prepare_prompts(args.input, args.out, template=args.template, tokenizer=args.tokenizer,
                              template_kwargs=dict(args.template_kwarg), plain_prompts=args.plain_prompts,
                              system=args.system, fields=fields, max_length=args.max_length,
                              on_overflow=args.on_overflow, split=args.split, overwrite=args.overwrite,
                              show_progress=not args.quiet)
    print(shown_paths("\n".join(summary.lines())))
    if summary.rejected.get("too_long"):
        print(f"  {summary.rejected['too_long']:,} prompt(s) exceed --max-length {args.max_length} "
              "(--on-overflow error): left out")
    return 0


def add_prompts_parsers(sub) -> None:
    p = sub.add_parser(
        "prepare-prompts", help="render RL prompts with verifiable answers (a reference answer, or "
                                "code tests) into token ids for GRPO",
        description="Renders each prompt (a plain string, or messages rendered with the chat "
                    "template up to the assistant's generation prompt) to token ids and keeps what "
                    "its reward needs: a reference answer (math; a GSM8K '#### N' answer becomes N) "
                    "or tests and the entry point they call (code, HumanEval's layout). Writes "
                    "PREFIX.prompts.jsonl, PREFIX.tokenizer/ and PREFIX.prompts.json under .partial "
                    "names, renamed when complete. Records that cannot be used are counted by "
                    "reason, never dropped silently.")
    add_source_flags(p, records="", writes="PREFIX.prompts.jsonl, PREFIX.tokenizer/, PREFIX.prompts.json")
    add_template_flags(p)
    p.add_argument("--template-kwarg", action="append", default=[], type=template_kwarg,
                   metavar="KEY=VALUE",
                   help="a chat template variable for every prompt, e.g. enable_thinking=false "
                        "(repeatable; a record's own chat_template_kwargs win)")
    p.add_argument("--plain-prompts", default="text", choices=["text", "user"],
                   help="a plain-string prompt: text (default: kept as is, the completion continues "
                        "it, as for HumanEval) or user (one user message, rendered with the template)")
    p.add_argument("--system", help="a system message put first in every chat prompt without one "
                                    "(e.g. a '/no_think' instruction)")
    p.add_argument("--prompt-key", default="prompt", help="record field with the prompt (default prompt)")
    p.add_argument("--answer-key", default="answer",
                   help="record field with the reference answer (default answer)")
    p.add_argument("--tests-key", default="test", help="record field with the code tests (default test)")
    p.add_argument("--entry-point-key", default="entry_point",
                   help="record field with the function the tests call (default entry_point)")
    p.add_argument("--max-length", type=positive_int, help="longest prompt in tokens")
    p.add_argument("--on-overflow", default="error", choices=["error", "drop"],
                   help="a prompt over --max-length is left out: error (default: reported as an "
                        "error count) or drop (counted)")
    add_output_flags(p)
    p.set_defaults(func=cmd_prepare_prompts)
