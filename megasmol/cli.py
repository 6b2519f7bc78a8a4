"""The ``megasmol`` command: parse arguments, call one function, print the result."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from pathlib import Path

from megasmol.ablate.commands import add_ablate_parsers
from megasmol.chat.commands import add_chat_parsers
from megasmol.config.run import cli_override
from megasmol.convert.commands import add_convert_parsers
from megasmol.data.commands import add_data_parsers
from megasmol.data.preference.commands import add_preference_parsers
from megasmol.data.prompts.commands import add_prompts_parsers
from megasmol.decode.commands import add_decode_parsers
from megasmol.errors import RunFailure, UserError
from megasmol.eval.commands import add_eval_parser
from megasmol.plan.commands import add_plan_parser
from megasmol.preflight.commands import add_preflight_parser
from megasmol.preflight.engine_commands import add_rl_parsers
from megasmol.runtime.openmp import passive_waits
from megasmol.utils.argtypes import InputPath, at_least, input_path, positive_float, positive_int
from megasmol.utils.fs import shown, shown_paths
from megasmol.utils.s3_url import is_url

# One line instead of a traceback (megasmol/errors.py): a run that could not go on (exit 1), bad
# input (exit 2); Python's own errors for a missing or existing file are input too. Any other
# exception (a bare ValueError included) is a bug and keeps its traceback.
INPUT_ERRORS = (UserError, FileExistsError, FileNotFoundError)


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
    from megasmol.config.parallel import ParallelLayout
    from megasmol.model.init import init_checkpoint
    from megasmol.model.spec import load_model_spec
    from megasmol.runtime.distributed import shutdown

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
            print(f"wrote {shown(path)} ({spec.name}, TP={layout.tensor_parallel}, "
                  f"PP={layout.pipeline_parallel}, seed {args.seed})")
    finally:
        shutdown()
    return 0


def _training_process() -> None:
    """Logging and warning setup shared by the commands that train."""
    import logging

    # Megatron's checkpoint writer starts helper processes that re-import it without this
    # process's warning filters; keep its import-time notices about optional kernels quiet there.
    _child_warning_filter("ignore::UserWarning")
    from megasmol.utils.console import configure_console_logging

    configure_console_logging(logging.INFO)  # plain lines, relative paths, no logger names
    for noisy in ("megatron", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A failed checkpoint write is reported once, as megasmol's one line naming the directory and
    # the cause (train/loop.py); Megatron's writer would log the same failure a second time.
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(
        logging.CRITICAL)


def cmd_demo(args) -> int:
    from megasmol.demo import run_demo

    _training_process()
    if args.ablation:
        from megasmol.ablate.demo import run_ablation_demo

        return run_ablation_demo(Path(args.workdir), steps=args.steps or 60, overrides=args.set)
    if args.sft:
        from megasmol.chat.demo import run_sft_demo

        return run_sft_demo(Path(args.workdir), steps=args.steps or 150, overrides=args.set)
    if args.preference:
        from megasmol.chat.preference_demo import run_preference_demo

        return run_preference_demo(Path(args.workdir), steps=args.steps or 60, overrides=args.set)
    if args.rl:
        from megasmol.chat.rl_demo import run_rl_demo

        return run_rl_demo(Path(args.workdir), steps=args.steps or 30, overrides=args.set)
    return run_demo(Path(args.workdir), steps=args.steps or 150, overrides=args.set,
                    code_mb=args.code_mb, math_problems=args.math_problems)


def cmd_train(args) -> int:
    from megasmol.config.run import load_run_config

    config = load_run_config(args.config, args.set)  # a config mistake is reported before torch loads
    from megasmol.config.parallel import job_world_size

    # so is a layout this many processes (less the spare ones) cannot hold
    config.parallel.check(config.resilience.training_world_size(job_world_size()))

    from megasmol.runtime.distributed import shutdown

    if config.resilience.in_process_restart:
        # Before torch loads (it reads this once): NVRx polls its store with waits that time out
        # by design, and torch's C++ side would log a warning for each one.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
        from megasmol.train.inprocess import train_in_process as train
    else:
        from megasmol.train.loop import train

    _training_process()
    try:
        result = train(config)
    except BaseException:
        shutdown(peers_reachable=False)  # no farewell barrier: a peer may be gone
        raise
    shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.trained:
        first, last = result.first_and_last_loss()
        saved = f"checkpoint {shown(result.checkpoint)}" if result.checkpoint else "no checkpoint written"
        print(f"trained to step {result.last_step}: loss {first:.3f} (first steps) -> {last:.3f} "
              f"(last steps); {saved}")
    elif result.resumed_from is not None:
        stop = config.training.stop_after_step
        field, limit = (("training.stop_after_step", stop) if stop and stop < config.training.train_steps
                        else ("training.train_steps", config.training.train_steps))
        print(f"nothing to train: the run is at step {result.resumed_from} and {field} is {limit}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, suggesting the closest choice for a mistyped one (``trian``: did you mean
    ``train``?); every subcommand's parser is one too (argparse builds them with the parent's class)."""

    def _check_value(self, action, value):  # argparse's one place that checks choices
        if action.choices is not None and value not in action.choices:
            names = [str(choice) for choice in action.choices]
            close = difflib.get_close_matches(str(value), names, n=1)
            if close:
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r}; did you mean {close[0]!r}? "
                            f"(choose from {', '.join(map(repr, names))})")
        super()._check_value(action, value)


class _Version(argparse.Action):
    """``--version``: megasmol's version, and the Megatron-Core, torch and Python it runs on (read
    from the installed packages' metadata, so nothing heavy is imported)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS,
                 help="print megasmol's version (and Megatron-Core's, torch's, Python's) and exit"):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from importlib import metadata

        from megasmol import __version__

        def version(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "not installed"

        print(f"megasmol {__version__} (megatron-core {version('megatron-core')}, torch "
              f"{version('torch')}, Python {sys.version.split()[0]})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="megasmol",
        description="SmolLM3-style pretraining and post-training (SFT, DPO / APO, GRPO) on Megatron-Core.",
        epilog="Start with `megasmol demo`; every command has --help; the guides are in docs/.")
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "info", help="show a model spec: shape, parameters, FLOPs per token",
        description="Prints a model spec's architecture (layers, widths, heads, NoPE layers, RoPE "
                    "theta, tied embeddings), its parameter count and its training FLOPs per token "
                    "at --seq-length. Without --spec, lists the presets in model_specs/.")
    p.add_argument("--spec", help="preset name (model_specs/) or spec YAML; none lists presets")
    p.add_argument("--seq-length", type=int, default=4096, help="for FLOPs per token (default 4096)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "init", help="write a randomly initialized checkpoint (any TP/PP under torchrun)",
        description="Builds the spec's model with Megatron-Core, initializes it with --seed and saves "
                    "it as a checkpoint (loadable under any TP/PP layout), with --tokenizer stored "
                    "beside it. Under torchrun with --tensor-parallel/--pipeline-parallel each rank "
                    "initializes its own part; --cpu-init gives the same weights for every layout.")
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

    add_convert_parsers(sub)
    add_decode_parsers(sub)
    add_data_parsers(sub)

    p = sub.add_parser(
        "train", help="train (or resume) a run from its YAML config; under torchrun for TP/PP/DP",
        description="Runs the stage(s) in the config on Megatron-Core. Rerunning the same command "
                    "resumes from the latest complete checkpoint in the run's checkpoint directory.")
    p.add_argument("--config", required=True, type=input_path("--config"),
                   help="run config YAML (see examples/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="override a config field, e.g. schedule.lr=3e-4 (repeatable)")
    p.set_defaults(func=cmd_train)

    add_plan_parser(sub)

    add_eval_parser(sub)
    add_preflight_parser(sub)
    add_ablate_parsers(sub)
    add_chat_parsers(sub)
    add_preference_parsers(sub)
    add_prompts_parsers(sub)
    add_rl_parsers(sub)

    p = sub.add_parser(
        "demo", help="the end-to-end CPU demo: corpus, tokenize, train smollm3-tiny, export, sample",
        description="Builds the demo corpus, trains smollm3-tiny with examples/tiny/demo.yaml, "
                    "plots the loss, exports to Hugging Face format and samples with transformers. "
                    "Also under torchrun --nproc_per_node 2 with --set parallel.tensor_parallel=2.")
    p.add_argument("--workdir", default="runs/demo", help="where to write (default runs/demo)")
    p.add_argument("--steps", type=at_least(10),
                   help="training steps, 10 or more (default 150; 60 per run with --ablation; 150 "
                        "with --sft; 60 with --preference; 30 with --rl); the schedule, the checkpoints and "
                        "the pass criterion scale with it")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--ablation", action="store_true",
                      help="instead: a small ablation (two LRs x two seeds, scored in the loop), then "
                           "compare: table, task quality, plots")
    mode.add_argument("--sft", action="store_true",
                      help="after the pretraining demo (run first if missing): SFT on generated "
                           "arithmetic conversations in SmolLM3's template, held-out accuracy before "
                           "and after, a chat reply")
    mode.add_argument("--preference", action="store_true",
                      help="after the SFT demo (run first if missing): APO-zero on generated pairs "
                           "(correct sum chosen over a wrong one), held-out reward accuracy and "
                           "arithmetic accuracy before and after")
    mode.add_argument("--rl", action="store_true",
                      help="after the SFT demo (run first if missing): GRPO on arithmetic prompts "
                           "(completions sampled by the model being trained, the verifiable answer-form "
                           "reward), the reward over training and the held-out answer form, operands and "
                           "sums before and after")
    p.add_argument("--code-mb", type=positive_float, default=3.0,
                   help="the demo corpus's standard-library code, when the pretraining demo builds it "
                        "(default 3 MB, as demo-corpus --code-mb; a corpus already in WORKDIR is reused)")
    p.add_argument("--math-problems", type=positive_int, default=20000,
                   help="the demo corpus's word problems, when the pretraining demo builds it (default "
                        "20000, as demo-corpus --math-problems)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="override a field of examples/tiny/demo.yaml (tiny/sft.yaml with --sft, "
                        "tiny/apo.yaml with --preference, tiny/grpo.yaml with --rl; repeatable)")
    p.set_defaults(func=cmd_demo)
    return parser


def _child_warning_filter(spec: str) -> None:
    """Add a ``PYTHONWARNINGS`` entry for the processes this one starts (multiprocessing's spawned
    workers import torch before anything of megasmol, so its filters do not reach them)."""
    current = [s for s in os.environ.get("PYTHONWARNINGS", "").split(",") if s]
    if spec not in current:
        os.environ["PYTHONWARNINGS"] = ",".join([*current, spec])


def _quiet_import_warnings() -> None:
    _child_warning_filter("ignore:The pynvml package is deprecated:FutureWarning")
    # Megatron-Core warns at import time about optional kernels (Apex, TE) that megasmol's
    # spec selection already accounts for; keep the console for what the user asked.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*torch_dtype.*deprecated")
    warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
    # Megatron's DDP reads .grad of expanded parameter views to find their grad accumulators.
    warnings.filterwarnings("ignore", message=r"The .grad attribute of a Tensor that is not a leaf")


CHECKPOINT_FLAGS = ("--checkpoint", "--checkpoints")


def _local_checkpoints(value):
    """``value`` (one checkpoint argument or a list) with each ``s3://`` item replaced by its
    local copy (downloaded once into the cache: ``ckpt/remote.py``)."""
    from megasmol.ckpt.remote import fetch

    def local(item):
        if not is_url(item):
            return item
        copy = InputPath(fetch(item, item.flag))
        copy.flag = item.flag
        return copy

    return [local(v) for v in value] if isinstance(value, list) else local(value)


def _check_inputs(args) -> None:
    """Every argument typed ``input_path`` names something that exists, and every checkpoint
    argument a checkpoint (or a run directory that keeps one): checked before any command imports
    torch, Megatron-Core or transformers."""
    from megasmol.ckpt.locate import checkpoint_problem
    from megasmol.config.typed import ConfigError
    from megasmol.convert.hf_dir import check_hf_model_dir

    for name, value in vars(args).items():
        if any(isinstance(v, InputPath) and v.flag in CHECKPOINT_FLAGS and is_url(v)
               for v in (value if isinstance(value, list) else [value])):
            value = _local_checkpoints(value)  # s3:// checkpoints: their local copies
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, InputPath) and item.missing():
                raise ConfigError(f"{item.flag} {item}: no such file or directory")
            if isinstance(item, InputPath) and item.flag in CHECKPOINT_FLAGS:
                problem = checkpoint_problem(item, hf_option=hasattr(args, "hf"))
                if problem:
                    raise ConfigError(f"{item.flag} {problem}")
            if isinstance(item, InputPath) and item.flag == "--hf":
                check_hf_model_dir(item)
        if any(isinstance(item, InputPath) for item in items):  # plain strings from here on
            setattr(args, name, [str(v) for v in value] if isinstance(value, list) else str(value))


def main(argv=None) -> int:
    passive_waits()  # before anything loads torch (runtime/openmp.py)
    _quiet_import_warnings()
    args = build_parser().parse_args(argv)
    try:
        _check_inputs(args)
        return args.func(args)
    except Exception as exc:  # one clear line for bad input; tracebacks for real bugs
        if isinstance(exc, RunFailure):
            if not exc.reported:
                print(f"megasmol {args.command}: error: {shown_paths(str(exc))}", file=sys.stderr)
            return RunFailure.exit_code
        if isinstance(exc, INPUT_ERRORS):
            print(f"megasmol {args.command}: error: {shown_paths(str(exc))}", file=sys.stderr)
            return UserError.exit_code
        raise


if __name__ == "__main__":
    raise SystemExit(main())
