"""``megasmol prepare-chat`` and ``megasmol chat``: parse, call one function, print."""

from __future__ import annotations

from megasmol.data.prepare_flags import add_output_flags, add_source_flags, add_template_flags
from megasmol.utils.argtypes import add_model_choice, positive_int


def cmd_prepare_chat(args) -> int:
    from megasmol.data.chat.prepare import prepare_chat

    summary = prepare_chat(args.input, args.out, template=args.template, tokenizer=args.tokenizer,
                           max_length=args.max_length, on_overflow=args.on_overflow,
                           loss_on=args.loss_on, messages_key=args.messages_key, split=args.split,
                           overwrite=args.overwrite, show_progress=not args.quiet)
    print("\n".join(summary.lines()))
    if summary.rejected.get("preference_pair"):
        print(f"  {summary.rejected['preference_pair']:,} record(s) are preference pairs "
              "(chosen/rejected): prepare them with `megasmol prepare-preferences`")
    if summary.rejected.get("too_long"):
        print(f"  {summary.rejected['too_long']:,} conversation(s) exceed --max-length {args.max_length} "
              "(--on-overflow error): left out; use --on-overflow truncate to keep them cut")
    return 0


def cmd_chat(args) -> int:
    from megasmol.chat.session import ChatSession
    from megasmol.decode.sampling import SamplingParams
    from megasmol.runtime.distributed import shutdown

    think = True if args.think else (False if args.no_think else None)
    try:
        build = ChatSession.from_hf if args.hf else ChatSession.from_checkpoint
        session = build(args.hf or args.checkpoint, tokenizer=args.tokenizer, template=args.template,
                        system=args.system, think=think, max_new_tokens=args.max_new_tokens,
                        sampling=SamplingParams(temperature=args.temperature, top_p=args.top_p,
                                                top_k=args.top_k),
                        seed=args.seed)
        if args.message is not None:
            for message in args.message:
                print(f"user> {message}")
                print(f"assistant> {session.reply(message)}")
            return 0
        print("chat with the model (/reset clears the history, /exit or Ctrl-D leaves)")
        while True:
            try:
                line = input("user> ")
            except EOFError:
                print()
                return 0
            if line.strip() == "/exit":
                return 0
            if line.strip() == "/reset":
                session.reset()
                continue
            if line.strip():
                print(f"assistant> {session.reply(line)}")
    finally:
        shutdown()


def add_chat_parsers(sub) -> None:
    p = sub.add_parser(
        "prepare-chat", help="render conversations with a chat template into tokens + a loss mask "
                             "(Megatron indexed datasets) for SFT / mid-training",
        description="Renders each {messages: [{role, content}]} record with the chat template, "
                    "tokenizes it and writes the tokens and an aligned loss mask (1 on the "
                    "assistant replies and their end-of-turn token, or on every token with "
                    "--loss-on all) as Megatron-Core indexed datasets, with the tokenizer (its chat "
                    "template set) beside them. Records that cannot be used are counted by reason, "
                    "never dropped silently. Preference pairs (chosen/rejected): "
                    "prepare-preferences.")
    add_source_flags(p, records=" of {messages: [{role, content}]} records",
                     writes="PREFIX.bin/.idx, PREFIX_lossmask.bin/.idx, PREFIX.tokenizer/, PREFIX.chat.json")
    add_template_flags(p)
    p.add_argument("--max-length", type=int, help="longest conversation in tokens (EOS included)")
    p.add_argument("--on-overflow", default="error", choices=["error", "truncate", "drop"],
                   help="a conversation over --max-length: error (default: left out, reported as an "
                        "error count), truncate (cut to the limit), drop (left out, counted)")
    p.add_argument("--loss-on", default="assistant", choices=["assistant", "all"],
                   help="assistant (default, SFT): replies and their end-of-turn token; "
                        "all (mid-training): every token")
    p.add_argument("--messages-key", default="messages", help="record field with the messages")
    add_output_flags(p)
    p.set_defaults(func=cmd_prepare_chat)

    p = sub.add_parser(
        "chat", help="chat with a checkpoint or a Hugging Face model in the terminal (or one --message)",
        description="Each turn is rendered with the model's chat template (or --template) and "
                    "answered greedily (or sampled with --temperature/--top-k/--top-p) with a KV cache, up "
                    "to --max-new-tokens or the end-of-turn token. Interactive: /reset clears the "
                    "history, /exit or Ctrl-D leaves; with --message, each one is sent in turn and "
                    "the replies printed.")
    add_model_choice(p, "checkpoint root, iteration directory or run directory (Megatron-Core)",
                     "a Hugging Face model directory, e.g. from export-hf --chat-template "
                     "(transformers, with its KV cache)")
    p.add_argument("--message", action="append",
                   help="send this user message and print the reply, no prompt (repeat for turns)")
    p.add_argument("--system", help="system message (SmolLM3: /think or /no_think inside it switch mode)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--think", action="store_true", help="reasoning mode (SmolLM3 template)")
    mode.add_argument("--no-think", action="store_true", help="no reasoning (empty think block prefilled)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256,
                   help="reply length limit (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1)")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample only from the K most likely tokens (default 0: off)")
    p.add_argument("--seed", type=int, help="sampling seed")
    p.add_argument("--template", help="chat template instead of the checkpoint's (smollm3, chatml, FILE)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's or the model's)")
    p.set_defaults(func=cmd_chat)
