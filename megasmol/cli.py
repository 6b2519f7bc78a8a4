"""The ``megasmol`` command: parse arguments, call one function, print the result."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

ERRORS_SHOWN_PLAINLY = ("ConfigError", "CheckpointError", "FileExistsError", "FileNotFoundError")


def _dtype(name: str):
    import torch

    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise argparse.ArgumentTypeError(f"dtype must be one of {', '.join(table)}")
    return table[name]


def cmd_info(args) -> int:
    from megasmol.model.flops import flops_per_token, parameter_count
    from megasmol.model.spec import load_model_spec, preset_names

    if args.spec is None:
        print("model presets: " + ", ".join(preset_names()))
        return 0
    spec = load_model_spec(args.spec)
    counts = parameter_count(spec)
    rows = [
        ("architecture", spec.architecture),
        ("layers / hidden / ffn", f"{spec.num_layers} / {spec.hidden_size} / {spec.ffn_hidden_size}"),
        ("heads / kv heads / head dim",
         f"{spec.num_attention_heads} / {spec.num_kv_heads} / {spec.kv_channels}"),
        ("NoPE layers (0-indexed)",
         ", ".join(str(i) for i, s in enumerate(spec.rope_skipped()) if s) or "none"),
        ("rope theta", f"{spec.rope_theta:g}"),
        ("tied embeddings", str(spec.tie_embeddings)),
        ("parameters", f"{counts.total:,} ({counts.total / 1e9:.3f} B)"),
        ("  embedding", f"{counts.embedding:,}"),
        ("  transformer layers", f"{counts.transformer:,}"),
        (f"training FLOPs/token @ seq {args.seq_length}",
         f"{flops_per_token(spec, args.seq_length):.4g}"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"{spec.name}  ({spec.source})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


def cmd_init(args) -> int:
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec
    from megasmol.runtime.distributed import shutdown
    from megasmol.runtime.parallel import ParallelLayout

    spec = load_model_spec(args.spec)
    layout = ParallelLayout(tensor_parallel=args.tensor_parallel,
                            pipeline_parallel=args.pipeline_parallel)
    try:
        path = init_checkpoint(
            spec, args.out, layout=layout, seed=args.seed, params_dtype=args.dtype,
            cpu_initialization=args.cpu_init, tokenizer=args.tokenizer,
        )
        import torch

        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            print(f"wrote {path} ({spec.name}, TP={layout.tensor_parallel}, "
                  f"PP={layout.pipeline_parallel}, seed {args.seed})")
    finally:
        shutdown()
    return 0


def cmd_export_hf(args) -> int:
    from megasmol.convert.export import export_hf
    from megasmol.model.spec import YarnSpec

    yarn = None
    if args.yarn_factor is not None:
        yarn = YarnSpec(factor=args.yarn_factor,
                        original_max_position_embeddings=args.yarn_original_max_positions)
        yarn.validate()
    report = export_hf(
        args.checkpoint, args.out, dtype=args.dtype, yarn=yarn, tokenizer=args.tokenizer,
        max_shard_bytes=int(args.max_shard_gb * 1024**3), overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    print(f"wrote {report.out_dir}: {report.tensors} tensors in {report.shards} shard(s), "
          f"{report.total_bytes / 1e6:.1f} MB, tokenizer {'included' if report.tokenizer else 'not given'}")
    return 0


def cmd_import_hf(args) -> int:
    from megasmol.convert.import_hf import import_hf
    from megasmol.runtime.distributed import shutdown

    try:
        path = import_hf(args.hf, args.out, name=args.name, show_progress=not args.quiet)
    finally:
        shutdown()
    print(f"wrote {path}")
    return 0


def cmd_generate(args) -> int:
    from megasmol.ckpt.checkpoint import tokenizer_dir
    from megasmol.config.typed import ConfigError
    from megasmol.generate import greedy_generate
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


def _training_process() -> None:
    """Logging and warning setup shared by the commands that train."""
    import logging

    # Megatron's checkpoint writer starts helper processes that re-import it without this
    # process's warning filters; keep its import-time notices about optional kernels quiet there.
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_demo(args) -> int:
    from megasmol.demo import run_demo

    _training_process()
    return run_demo(Path(args.workdir), steps=args.steps, overrides=args.set)


def cmd_prepare_data(args) -> int:
    from megasmol.data.tokenize import prepare_data

    summary = prepare_data(args.input, args.out, tokenizer=args.tokenizer, text_key=args.text_key,
                           workers=args.workers, dtype=args.dtype, overwrite=args.overwrite,
                           skip_bad_files=args.skip_bad_files, show_progress=not args.quiet)
    print("\n".join(summary.lines()))
    print(f"  stats      {args.out}.stats.json")
    return 0


def cmd_demo_corpus(args) -> int:
    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus

    manifest = build_demo_corpus(args.out, code_mb=args.code_mb, math_problems=args.math_problems,
                                 seed=args.seed)
    print(f"demo corpus in {args.out} (Python {manifest['python']}, seed {manifest['seed']})")
    for domain, info in manifest["domains"].items():
        print(f"  {domain:<6} {info['documents']:>7,} documents  {info['characters']:>11,} characters")
    if args.tokenize:
        for domain, summary in tokenize_demo_corpus(args.out, tokenizer=args.tokenizer,
                                                    workers=args.workers, overwrite=True,
                                                    show_progress=not args.quiet).items():
            print(f"  {domain:<6} {summary.tokens:>11,} tokens -> {summary.output_prefix}")
    return 0


def cmd_train(args) -> int:
    from megasmol.config.run import load_run_config
    from megasmol.runtime.distributed import shutdown
    from megasmol.train.loop import train

    _training_process()
    config = load_run_config(args.config, args.set)
    try:
        result = train(config)
    finally:
        shutdown()
    if result.losses and int(os.environ.get("RANK", "0")) == 0:
        first, last = result.first_and_last_loss()
        print(f"trained to step {result.last_step}: loss {first:.3f} (first steps) -> {last:.3f} "
              f"(last steps); checkpoint {result.checkpoint}")
    return 0


def cmd_preflight(args) -> int:
    from megasmol.preflight.runner import PreflightOptions, run_preflight
    from megasmol.runtime.distributed import shutdown

    options = PreflightOptions(
        level=args.level, config=args.config, overrides=args.set, burn_seconds=args.burn_seconds,
        gemm_size=args.gemm_size, gemm_tolerance=args.gemm_tolerance,
        straggler_tolerance=args.straggler_tolerance, min_membw_gbps=args.min_membw_gbps,
        min_busbw_gbps=args.min_busbw_gbps, min_read_gbps=args.min_read_gbps,
        min_write_gbps=args.min_write_gbps, data_paths=args.data_path,
        checkpoint_dir=args.checkpoint_dir, world_size=args.world_size,
        device_memory_gb=args.device_memory_gb,
        skip=[s for item in args.skip for s in item.split(",") if s])
    try:
        report = run_preflight(options)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.render(args.strict))
        if args.json:
            print(f"report: {report.write_json(args.json)}")
    return report.exit_code(args.strict)


def cmd_eval_passkey(args) -> int:
    from tqdm import tqdm

    from megasmol.ckpt.checkpoint import tokenizer_dir
    from megasmol.longctx.passkey import evaluate, hf_generator, megatron_generator, write_outputs
    from megasmol.tokenizer import load_tokenizer

    if bool(args.checkpoint) == bool(args.hf):
        raise ValueError("give exactly one of --checkpoint or --hf")
    lengths = [_token_count(x) for x in args.lengths.split(",") if x]
    depths = [float(x) for x in args.depths.split(",") if x]
    if not lengths or not depths or any(not 0 <= d <= 1 for d in depths):
        raise ValueError("--lengths needs token counts (e.g. 1k,4k) and --depths fractions in [0, 1]")
    if args.checkpoint:
        generate = megatron_generator(args.checkpoint, args.max_new_tokens, args.yarn_factor)
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir(args.checkpoint))
    else:
        generate = hf_generator(args.hf, args.max_new_tokens)
        tokenizer = load_tokenizer(args.tokenizer or args.hf)
    total = len(lengths) * len(depths) * args.trials
    with tqdm(total=total, unit="trial", disable=args.quiet) as bar:
        result = evaluate(generate, tokenizer, lengths, depths, args.trials, args.seed, progress=bar)
    print(result.table())
    label = str(args.checkpoint or args.hf)
    report, png = write_outputs(result, Path(args.out), label)
    print(f"report: {report}\nheat map: {png}")
    return 0


def _token_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(text[-1:], 1)
    try:
        return int(float(text[:-1] if scale > 1 else text) * scale)
    except ValueError:
        raise ValueError(f"--lengths: {text!r} is not a token count like 4096 or 4k") from None


def _number(text: str) -> float:
    """3e9, 3B, 11T, 1.5M ... as a float."""
    text = str(text).strip()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(text[-1:].lower(), 1.0)
    try:
        return float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ValueError(f"{text!r} is not a number like 3e9, 3B or 11T") from None


def _parameters(args) -> float:
    if args.spec:
        from megasmol.model.flops import parameter_count
        from megasmol.model.spec import load_model_spec

        return float(parameter_count(load_model_spec(args.spec)).total)
    if args.params is None:
        raise ValueError("give --params (e.g. 3B) or --spec")
    return _number(args.params)


def _peak(args) -> float:
    from megasmol.plan.compute import GPU_PEAK_TFLOPS

    if args.peak_tflops is not None:
        return args.peak_tflops
    if args.gpu.lower() not in GPU_PEAK_TFLOPS:
        raise ValueError(f"--gpu {args.gpu}: known {', '.join(GPU_PEAK_TFLOPS)}; or give --peak-tflops")
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
            raise ValueError("--lr needs --old-batch and --new-batch")
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
            raise ValueError(f"--text {item}: expected LANG=FILE, e.g. en=wiki_en.txt")
        if not Path(path).is_file():
            raise ValueError(f"--text {item}: no such file {path}")
        texts[language] = Path(path).read_text(encoding="utf-8")
    rows = fertility_table(tokenizers, texts)
    print(render(rows))
    if args.csv:
        print(f"csv: {write_csv(rows, args.csv)}")
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


def _plan_parsers(sub) -> None:
    p = sub.add_parser("plan", help="planning: compute/GPUs, hyper-parameters, fertility, layouts")
    plans = p.add_subparsers(dest="plan_command", required=True, metavar="PLAN")

    def model_args(q):
        q.add_argument("--params", help="parameters, e.g. 3B or 3e9")
        q.add_argument("--spec", help="or a model spec (preset or YAML) to count them")

    q = plans.add_parser("compute", help="C = 6ND, GPUs for a deadline or days for a GPU count")
    model_args(q)
    q.add_argument("--tokens", required=True, help="training tokens, e.g. 11T")
    q.add_argument("--gpu", default="h100", help="GPU for the peak FLOP/s (h100, h200, a100, b200, mi300x)")
    q.add_argument("--peak-tflops", type=float, help="per-GPU peak TFLOP/s (overrides --gpu)")
    q.add_argument("--mfu", type=float, default=0.30, help="expected MFU (default 0.30)")
    q.add_argument("--weeks", type=float, help="wall-clock target in weeks -> GPUs")
    q.add_argument("--days", type=float, help="wall-clock target in days -> GPUs")
    q.add_argument("--gpus", type=float, help="GPU count -> days")
    q.set_defaults(func=cmd_plan_compute)

    q = plans.add_parser("hparams", help="LR and batch from compute (DeepSeek fits); sqrt LR rule")
    model_args(q)
    q.add_argument("--tokens", help="training tokens (with --params/--spec)")
    q.add_argument("--flops", help="or the compute budget C directly, e.g. 1e21")
    q.add_argument("--seq-length", type=int, help="show the batch in sequences of this length")
    q.add_argument("--lr", type=float, help="sqrt rule: the LR at --old-batch")
    q.add_argument("--old-batch", help="sqrt rule: the batch the LR was tuned at")
    q.add_argument("--new-batch", help="sqrt rule: the new batch")
    q.set_defaults(func=cmd_plan_hparams)

    q = plans.add_parser("fertility",
                         help="tokens per word and continued-word share per tokenizer x language")
    q.add_argument("--tokenizer", action="append", required=True, metavar="[LABEL=]DIR",
                   help="tokenizer directory (repeatable)")
    q.add_argument("--text", action="append", required=True, metavar="LANG=FILE",
                   help="text file per ISO language code (repeatable)")
    q.add_argument("--csv", help="also write the table as CSV")
    q.set_defaults(func=cmd_plan_fertility)

    q = plans.add_parser("layout", help="TP/PP/CP/micro-batch layouts that fit, ranked")
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


def cmd_data_audit(args) -> int:
    from megasmol.config.run import load_run_config
    from megasmol.data.audit import audit_run

    report = audit_run(load_run_config(args.config, args.set))
    print(report.render())
    return 0 if report.ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megasmol", description="SmolLM3-style pretraining on Megatron-Core.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="show a model spec: shape, parameters, FLOPs per token")
    p.add_argument("--spec", help="preset name (model_specs/) or spec YAML; none lists presets")
    p.add_argument("--seq-length", type=int, default=4096, help="for FLOPs per token (default 4096)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("init", help="write a randomly initialized checkpoint (any TP/PP under torchrun)")
    p.add_argument("--spec", required=True, help="preset name or spec YAML")
    p.add_argument("--out", required=True, help="checkpoint root directory to write")
    p.add_argument("--tensor-parallel", type=int, default=1, help="TP size (default 1)")
    p.add_argument("--pipeline-parallel", type=int, default=1, help="PP size (default 1)")
    p.add_argument("--seed", type=int, default=1234, help="random seed (default 1234)")
    p.add_argument("--dtype", type=_dtype, default="float32", help="float32 (default) or bfloat16")
    p.add_argument("--cpu-init", action="store_true",
                   help="initialize full weights on CPU then split (same weights for any TP)")
    p.add_argument("--tokenizer", help="tokenizer directory to store with the checkpoint")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export-hf", help="convert a checkpoint to a Hugging Face model directory")
    p.add_argument("--checkpoint", required=True, help="checkpoint root or iteration directory")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: as stored)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--yarn-factor", type=float, help="write a YaRN rope_scaling block with this factor")
    p.add_argument("--yarn-original-max-positions", type=int, default=65536,
                   help="YaRN original_max_position_embeddings (default 65536)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser("import-hf", help="convert a Hugging Face SmolLM3/Llama model to a checkpoint")
    p.add_argument("--hf", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root directory to write")
    p.add_argument("--name", help="model name recorded in the spec (default: directory name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("generate", help="greedy decoding with a checkpoint's Megatron model")
    p.add_argument("--checkpoint", required=True, help="checkpoint root or iteration directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--show-ids", action="store_true", help="also print the token ids")
    p.add_argument("--yarn-factor", type=float,
                   help="run with YaRN scaling by this factor over the trained length (e.g. 2)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("prepare-data", help="tokenize JSONL / text / Parquet into a Megatron indexed dataset")
    p.add_argument("--input", required=True, nargs="+", help="files, directories or globs")
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

    p = sub.add_parser("demo-corpus", help="build the embedded prose/code/math demo corpus")
    p.add_argument("--out", default="runs/demo/corpus", help="directory (default runs/demo/corpus)")
    p.add_argument("--tokenize", action="store_true", help="also tokenize it into OUT/tokens/")
    p.add_argument("--tokenizer", help="tokenizer directory (default: Llama-3.2)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--code-mb", type=float, default=3.0, help="standard-library code budget (default 3 MB)")
    p.add_argument("--math-problems", type=int, default=20000, help="word problems (default 20000)")
    p.add_argument("--seed", type=int, default=1234, help="seed for code sampling and problems")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo_corpus)

    p = sub.add_parser("data-audit", help="tokens available / drawn / epochs per stage and dataset")
    p.add_argument("--config", required=True, help="run config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. training.train_steps=1000 (repeatable)")
    p.set_defaults(func=cmd_data_audit)

    p = sub.add_parser(
        "train", help="train (or resume) a run from its YAML config; under torchrun for TP/PP/DP",
        description="Runs the stage(s) in the config on Megatron-Core. Rerunning the same command "
                    "resumes from the latest complete checkpoint in the run's checkpoint directory.")
    p.add_argument("--config", required=True, help="run config YAML (see examples/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. schedule.lr=3e-4 (repeatable)")
    p.set_defaults(func=cmd_train)

    _plan_parsers(sub)

    p = sub.add_parser("eval", help="evaluations: passkey retrieval")
    evals = p.add_subparsers(dest="eval_command", required=True, metavar="EVAL")
    p = evals.add_parser(
        "passkey", help="needle-in-a-haystack retrieval accuracy by length and depth",
        description="Builds prompts of each length with a 5-digit pass key hidden at each depth in "
                    "filler text, decodes greedily and scores only the generated tokens. Writes a "
                    "table, OUT/passkey.json and a heat map OUT/passkey.png.")
    p.add_argument("--checkpoint", help="megasmol checkpoint (Megatron-Core model)")
    p.add_argument("--hf", help="Hugging Face model directory (transformers)")
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

    p = sub.add_parser(
        "preflight", help="GPU burn, NVML, DCGM, collectives, storage and config dry-run: go / no-go",
        description="Run on every node before a job (single process, or under torchrun/srun for "
                    "collectives across the job). Exit 1 exactly when a check failed (or warned, "
                    "with --strict). Without a GPU every check that can run does; GPU-only ones "
                    "say 'skipped: no GPU'.")
    p.add_argument("--config", help="run config YAML: dry-run it and test its data and checkpoint paths")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--level", default="quick", choices=["quick", "standard", "long"],
                   help="quick (< 2 min, DCGM r1), standard (60 s burn, DCGM r2), long (5 min, DCGM r3)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--strict", action="store_true", help="warnings fail too")
    p.add_argument("--burn-seconds", type=float, help="GEMM burn length (default: by level)")
    p.add_argument("--gemm-size", type=int, help="GEMM size n for n^3 products (default 8192 GPU, 1024 CPU)")
    p.add_argument("--gemm-tolerance", type=float, default=0.10,
                   help="fail a device this far below the best one (default 0.10)")
    p.add_argument("--straggler-tolerance", type=float, default=0.20,
                   help="fail a rank this much slower than the median (default 0.20)")
    p.add_argument("--min-membw-gbps", type=float, help="memory bandwidth floor (default: 60%% of nominal)")
    p.add_argument("--min-busbw-gbps", type=float, help="collective bus bandwidth floor (default: none)")
    p.add_argument("--min-read-gbps", type=float, default=0.5, help="data read floor (default 0.5)")
    p.add_argument("--min-write-gbps", type=float, default=0.2, help="checkpoint write floor (default 0.2)")
    p.add_argument("--data-path", action="append", default=[],
                   help="a .bin file or a directory of them to read (default: the config's datasets)")
    p.add_argument("--checkpoint-dir", help="where to test writing (default: the config's)")
    p.add_argument("--world-size", type=int, help="dry-run the config for this many GPUs (default: this job)")
    p.add_argument("--device-memory-gb", type=float, help="GPU memory for the dry-run (default: detected)")
    p.add_argument("--skip", action="append", default=[], help="checks to leave out, comma separated")
    p.set_defaults(func=cmd_preflight)

    p = sub.add_parser(
        "demo", help="the end-to-end CPU demo: corpus, tokenize, train smollm3-tiny, export, sample",
        description="Builds the demo corpus, trains smollm3-tiny with examples/tiny/demo.yaml, "
                    "plots the loss, exports to Hugging Face format and samples with transformers. "
                    "Also under torchrun --nproc_per_node 2 with --set parallel.tensor_parallel=2.")
    p.add_argument("--workdir", default="runs/demo", help="where to write (default runs/demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of examples/tiny/demo.yaml (repeatable)")
    p.set_defaults(func=cmd_demo)
    return parser


def _quiet_import_warnings() -> None:
    # Megatron-Core warns at import time about optional kernels (Apex, TE) that megasmol's
    # spec selection already accounts for; keep the console for what the user asked.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch_dtype.*deprecated")
    warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
    # Megatron's DDP reads .grad of expanded parameter views to find their grad accumulators.
    warnings.filterwarnings("ignore", message=r"The .grad attribute of a Tensor that is not a leaf")


def main(argv=None) -> int:
    _quiet_import_warnings()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:  # one clear line for bad input; tracebacks for real bugs
        if type(exc).__name__ in ERRORS_SHOWN_PLAINLY or isinstance(exc, ValueError):
            print(f"megasmol {args.command}: error: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
