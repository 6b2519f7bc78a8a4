"""``megasmol plan ...``: the planning tools' command-line side (parsing and printing only)."""

from __future__ import annotations

from pathlib import Path

from megasmol.errors import InputError


def _number(text: str) -> float:
    """3e9, 3B, 11T, 1.5M ... as a float."""
    text = str(text).strip()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(text[-1:].lower(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise InputError(f"{text!r} is not a number like 3e9, 3B or 11T") from None


def _parameters(args) -> float:
    if args.spec:
        from megasmol.model.flops import parameter_count
        from megasmol.model.spec import load_model_spec

        return float(parameter_count(load_model_spec(args.spec)).total)
    if args.params is None:
        raise InputError("give --params (e.g. 3B) or --spec")
    return _number(args.params)


def _peak(args) -> float:
    from megasmol.plan.compute import GPU_PEAK_TFLOPS

    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.gpu.lower() not in GPU_PEAK_TFLOPS:
        raise InputError(f"--gpu {args.gpu}: known {', '.join(GPU_PEAK_TFLOPS)}; or give --peak-tflops")
    return GPU_PEAK_TFLOPS[args.gpu.lower()]


def cmd_plan_compute(args) -> int:
    from megasmol.plan.compute import size_cluster

    days = args.days if args.days is not None else (args.weeks * 7 if args.weeks is not None else None)
    sizing = size_cluster(_parameters(args), _number(args.tokens), _peak(args), args.mfu,
                          days=days, gpus=args.gpus)
    print(sizing.render())
    return 0


def cmd_plan_hparams(args) -> int:
    from megasmol.plan.compute import training_flops
    from megasmol.plan.hparams import sqrt_lr_scaling, suggest

    if args.lr is not None:
        if args.old_batch is None or args.new_batch is None:
            raise InputError("--lr needs --old-batch and --new-batch")
        new = sqrt_lr_scaling(args.lr, _number(args.old_batch), _number(args.new_batch))
        k = _number(args.new_batch) / _number(args.old_batch)
        print(f"batch x {k:g} -> LR x sqrt({k:g}) = {args.lr:.3e} -> {new:.3e}")
        from megasmol.plan.hparams import CAVEAT

        print("note: " + CAVEAT)
        return 0
    flops = _number(args.flops) if args.flops else training_flops(_parameters(args), _number(args.tokens))
    print(suggest(flops, args.seq_length).render())
    return 0


def cmd_plan_fertility(args) -> int:
    from megasmol.plan.fertility import fertility_table, render, write_csv
    from megasmol.tokenizer import load_tokenizer

    tokenizers = {}
    for item in args.tokenizer:
        label, _, path = item.rpartition("=")
        tokenizers[label or Path(path).name] = load_tokenizer(path)
    texts = {}
    for item in args.text:
        language, sep, path = item.partition("=")
        if not sep:
            raise InputError(f"--text {item}: expected LANG=FILE, e.g. en=wiki_en.txt")
        if not Path(path).is_file():
            raise InputError(f"--text {item}: no such file {path}")
        texts[language] = Path(path).read_text(encoding="utf-8")
    rows = fertility_table(tokenizers, texts)
    print(render(rows))
    if args.csv:
        from megasmol.utils.fs import shown

        print(f"csv: {shown(write_csv(rows, args.csv))}")
    return 0


def cmd_plan_layout(args) -> int:
    from megasmol.model.spec import load_model_spec
    from megasmol.plan.layout import fitting_layouts, render

    spec = load_model_spec(args.spec)
    options = fitting_layouts(spec, gpus=args.gpus, global_batch=args.global_batch,
                              seq_length=args.seq_length, memory_gb=args.memory_gb,
                              gpus_per_node=args.gpus_per_node, precision=args.precision,
                              distributed_optimizer=not args.no_distributed_optimizer)
    print(f"{spec.name} on {args.gpus} GPUs of {args.memory_gb:g} GB, global batch {args.global_batch} x "
          f"{args.seq_length}")
    print(render(options, args.memory_gb, args.top))
    return 0 if options else 1


def add_plan_parser(sub) -> None:
    """Register ``megasmol plan compute|hparams|fertility|layout`` on the CLI's subparsers."""
    p = sub.add_parser(
        "plan", help="planning: compute/GPUs, hyper-parameters, fertility, layouts",
        description="Back-of-the-envelope planning before a run, as the SmolLM3 playbook does it: "
                    "compute (C = 6ND, GPUs or days), hparams (LR and batch from the compute "
                    "budget), fertility (tokens per word of tokenizers on your languages), layout "
                    "(TP/PP/CP/micro-batch combinations that fit in memory, ranked). Nothing here "
                    "needs a GPU.")
    plans = p.add_subparsers(dest="plan_command", required=True, metavar="PLAN")

    def model_args(q):
        q.add_argument("--params", help="parameters, e.g. 3B or 3e9")
        q.add_argument("--spec", help="or a model spec (preset or YAML) to count them")

    q = plans.add_parser(
        "compute", help="C = 6ND, GPUs for a deadline or days for a GPU count",
        description="Training compute C = 6 x parameters x tokens, and at --mfu of the GPU's dense "
                    "bf16 peak: the GPUs that finish in --weeks/--days, or the days --gpus take.")
    model_args(q)
    q.add_argument("--tokens", required=True, help="training tokens, e.g. 11T")
    q.add_argument("--gpu", default="h100", help="GPU for the peak FLOP/s (h100, h200, a100, b200, mi300x)")
    q.add_argument("--peak-tflops", type=float, help="per-GPU peak TFLOP/s (overrides --gpu)")
    q.add_argument("--mfu", type=float, default=0.30, help="expected MFU (default 0.30)")
    q.add_argument("--weeks", type=float, help="wall-clock target in weeks -> GPUs")
    q.add_argument("--days", type=float, help="wall-clock target in days -> GPUs")
    q.add_argument("--gpus", type=float, help="GPU count -> days")
    q.set_defaults(func=cmd_plan_compute)

    q = plans.add_parser(
        "hparams", help="LR and batch from compute (DeepSeek fits); sqrt LR rule",
        description="The learning rate and batch size DeepSeek LLM's fits give for a compute "
                    "budget (from --params/--spec and --tokens, or --flops); or, with --lr, "
                    "--old-batch and --new-batch, the square-root rule for a batch change.")
    model_args(q)
    q.add_argument("--tokens", help="training tokens (with --params/--spec)")
    q.add_argument("--flops", help="or the compute budget C directly, e.g. 1e21")
    q.add_argument("--seq-length", type=int, help="show the batch in sequences of this length")
    q.add_argument("--lr", type=float, help="sqrt rule: the LR at --old-batch")
    q.add_argument("--old-batch", help="sqrt rule: the batch the LR was tuned at")
    q.add_argument("--new-batch", help="sqrt rule: the new batch")
    q.set_defaults(func=cmd_plan_hparams)

    q = plans.add_parser(
        "fertility", help="tokens per word and continued-word share per tokenizer x language",
        description="For each tokenizer and language: tokens per word (fertility) and the share of "
                    "words split into two or more tokens (lower is better for both), words split "
                    "with datatrove's word tokenizers when installed, else Unicode word runs.")
    q.add_argument("--tokenizer", action="append", required=True, metavar="[LABEL=]DIR",
                   help="tokenizer directory, or llama3.2 (also: bundled) for the bundled "
                        "Llama-3.2 tokenizer (SmolLM3's), or a hub id where a hub is reachable; "
                        "LABEL= names its column (repeatable: one per tokenizer to compare)")
    q.add_argument("--text", action="append", required=True, metavar="LANG=FILE",
                   help="text file per ISO language code (repeatable)")
    q.add_argument("--csv", help="also write the table as CSV")
    q.set_defaults(func=cmd_plan_fertility)

    q = plans.add_parser(
        "layout", help="TP/PP/CP/micro-batch layouts that fit, ranked",
        description="Every TP/PP/CP/micro-batch combination for the model, --gpus and "
                    "--global-batch whose memory estimate (pre-flight's) fits --memory-gb, ranked "
                    "by a simple throughput model whose reasoning is printed. Exit code 1 when "
                    "none fits.")
    q.add_argument("--spec", required=True, help="model spec (preset or YAML)")
    q.add_argument("--gpus", type=int, required=True, help="GPU count")
    q.add_argument("--global-batch", type=int, required=True, help="sequences per step")
    q.add_argument("--seq-length", type=int, default=4096, help="sequence length (default 4096)")
    q.add_argument("--memory-gb", type=float, default=80.0, help="GPU memory (default 80)")
    q.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    q.add_argument("--precision", default="bf16", choices=["bf16", "fp8", "fp32"])
    q.add_argument("--no-distributed-optimizer", action="store_true", help="optimizer states not sharded")
    q.add_argument("--top", type=int, default=10, help="layouts to show (default 10)")
    q.set_defaults(func=cmd_plan_layout)
