"""``megasmol preflight``: the command-line side (options in, table and exit code out)."""

from __future__ import annotations

import os

from megasmol.config.run import cli_override
from megasmol.utils.argtypes import input_path


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
        skip=[s for item in args.skip for s in item.split(",") if s],
        expect_gpus=args.expect_gpus, allow_cpu=args.allow_cpu,
        throughput_tolerance=args.throughput_tolerance)
    try:
        report = run_preflight(options)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) == 0:
        print(report.render(args.strict))
        if args.json:
            from megasmol.utils.fs import shown

            print(f"report: {shown(report.write_json(args.json))}")
    return report.exit_code(args.strict)


def add_preflight_parser(sub) -> None:
    p = sub.add_parser(
        "preflight", help="GPU burn, NVML, DCGM, collectives, storage and config dry-run: go / no-go",
        description="Run on every node before a job (single process, or under torchrun/srun for "
                    "collectives across the job). Exit 1 exactly when a check failed (or warned, "
                    "with --strict). Without a GPU every check that can run does; GPU-only ones "
                    "say 'skipped: no GPU', unless the node lists GPUs that torch cannot see, or the "
                    "job needs GPUs (--expect-gpus, a bf16/fp8 --config): then it fails.")
    p.add_argument("--config", type=input_path("--config"),
                   help="run config YAML: dry-run it and test its data and checkpoint paths")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", type=cli_override,
                   help="override a config field")
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
    p.add_argument("--world-size", type=int,
                   help="dry-run the config for a job of this many GPUs (default: this job); "
                        "then this machine is not taken for one of that job's GPU nodes")
    p.add_argument("--device-memory-gb", type=float, help="GPU memory for the dry-run (default: detected)")
    p.add_argument("--skip", action="append", default=[], help="checks to leave out, comma separated")
    p.add_argument("--throughput-tolerance", type=float, default=0.8,
                   help="training_throughput fails below this share of the config's "
                        "logging.expected_tokens_per_s_per_gpu (default 0.8)")
    p.add_argument("--expect-gpus", type=int,
                   help="fail unless torch sees at least this many GPUs on this node (default: one "
                        "per local rank for a bf16/fp8 --config, else none)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="a bf16/fp8 config may be checked on a machine without GPUs")
    p.set_defaults(func=cmd_preflight)
