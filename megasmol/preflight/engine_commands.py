"""``megasmol rl check-engine``: parse, call one function (``engine_check.py``), exit 0 on a pass."""

from __future__ import annotations

from megasmol.config.run import cli_override
from megasmol.rl.logp_agreement import PASS_BELOW
from megasmol.utils.argtypes import input_path, positive_int


def cmd_check_engine(args) -> int:
    from megasmol.preflight.engine_check import check_engine

    passed = check_engine(args.config, args.set, args.checkpoint, args.prompts, args.threshold)
    return 0 if passed else 1


def add_rl_parsers(sub) -> None:
    rl = sub.add_parser(
        "rl", help="reinforcement learning tools (check-engine: the GPU engine against megasmol's)",
        description="Tools for RL runs (training itself is `megasmol train` with training.objective: rl).")
    commands = rl.add_subparsers(dest="rl_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "check-engine", help="on a GPU node: Megatron-Core's dynamic engine against megasmol's, "
                             "log-probs and speed",
        description="On a CUDA machine: samples one completion for each of the first --prompts "
                    "prompts of the run's first stage with Megatron-Core's DynamicInferenceEngine "
                    "(rl.engine: megatron-dynamic) and with megasmol's decoder, on the run's model "
                    "(--checkpoint, else checkpoint.init_from) with its rl: sampling settings, "
                    "recomputes the dynamic engine's completions' log-probs as the trainer does "
                    "(teacher-forced, the cross-entropy of logits / rl.temperature), and prints "
                    "each engine's tokens/s, the largest and mean |difference| and NeMo-RL's "
                    "token_mult_prob_error, with a verdict: PASS when token_mult_prob_error <= "
                    f"--threshold (default {PASS_BELOW:g}, NeMo-RL's CI bound). Exit 0 on PASS, 1 "
                    "on FAIL, 2 on bad input or a machine without CUDA.")
    p.add_argument("--config", required=True, type=input_path("--config"), help="the RL run's config YAML")
    p.add_argument("--checkpoint", type=input_path("--checkpoint"),
                   help="checkpoint root, iteration directory or run directory (default: the "
                        "config's checkpoint.init_from)")
    p.add_argument("--prompts", type=positive_int, default=8,
                   help="how many prompts of the first stage to sample (default 8)")
    p.add_argument("--threshold", type=float, default=PASS_BELOW,
                   help=f"largest token_mult_prob_error that passes (default {PASS_BELOW:g})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="override a config field, e.g. rl.temperature=0.7 (repeatable)")
    p.set_defaults(func=cmd_check_engine)
