"""``megasmol export-hf`` and ``import-hf``: a checkpoint to a Hugging Face model directory and
back (the weight mappings both share are in ``mappings.py``)."""

from __future__ import annotations

from megasmol.utils.argtypes import input_path
from megasmol.utils.fs import shown


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
        chat_template=args.chat_template, max_shard_bytes=int(args.max_shard_gb * 1024**3),
        overwrite=args.overwrite,
        show_progress=not args.quiet,
    )
    print(f"wrote {shown(report.out_dir)}: {report.tensors} tensors in {report.shards} shard(s), "
          f"{report.total_bytes / 1e6:.1f} MB, tokenizer {'included' if report.tokenizer else 'not given'}")
    return 0


def cmd_import_hf(args) -> int:
    from megasmol.convert.import_hf import import_hf
    from megasmol.runtime.distributed import shutdown

    try:
        path = import_hf(args.hf, args.out, name=args.name, show_progress=not args.quiet)
    finally:
        shutdown()
    print(f"wrote {shown(path)}")
    return 0


def add_convert_parsers(sub) -> None:
    p = sub.add_parser(
        "export-hf", help="convert a checkpoint to a Hugging Face model directory",
        description="Writes config.json, safetensors shards, generation_config.json and the "
                    "tokenizer (with its chat template), a directory transformers loads with "
                    "AutoModelForCausalLM. Reads a checkpoint of any TP/PP layout one tensor at a "
                    "time and writes OUT.partial, renamed to OUT when complete.")
    p.add_argument("--checkpoint", required=True, type=input_path("--checkpoint"),
                   help="checkpoint root, iteration directory or run directory")
    p.add_argument("--out", required=True, help="output directory (must be new or empty)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="output dtype (default: as stored)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--chat-template", metavar="NAME|FILE",
                   help="give the exported tokenizer this chat template (smollm3, chatml or a .jinja "
                        "file); a checkpoint trained on chat data already carries its own")
    p.add_argument("--yarn-factor", type=float, help="write a YaRN rope_scaling block with this factor")
    p.add_argument("--yarn-original-max-positions", type=int, default=65536,
                   help="YaRN original_max_position_embeddings (default 65536)")
    p.add_argument("--max-shard-gb", type=float, default=2.0, help="safetensors shard size (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export_hf)

    p = sub.add_parser(
        "import-hf", help="convert a Hugging Face SmolLM3/Llama model to a checkpoint",
        description="Reads a Hugging Face model directory's safetensors (never a pickle) one tensor "
                    "at a time, checks every name and shape against its config.json, and writes a "
                    "megasmol checkpoint with the tokenizer files found there: a start for "
                    "checkpoint.init_from, eval tasks or chat.")
    p.add_argument("--hf", required=True, type=input_path("--hf"),
                   help="HF model directory (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root directory to write")
    p.add_argument("--name", help="model name recorded in the spec (default: directory name)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_import_hf)
