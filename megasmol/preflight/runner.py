"""Run every check on every rank of the job and assemble one report (the same on all ranks).

Per-device checks (GEMM burn, memory bandwidth, NVML) run on each rank for its own device;
storage runs once per node (local rank 0); collectives and stragglers involve every rank; the
config dry-run is reported once. Results are exchanged with ``all_gather_object``, so every rank
returns the same exit code and ``srun megasmol preflight && srun megasmol train`` gates a job.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megasmol.errors import InputError
from megasmol.preflight import (
    collectives,
    compute,
    data_check,
    dcgm,
    dryrun,
    nvml_health,
    storage,
    visibility,
)
from megasmol.preflight.report import PreflightReport, skipped
from megasmol.runtime.distributed import current_device


@dataclass(frozen=True)
class Level:
    burn_seconds: float
    dcgm_level: int
    collective_sizes_mb: tuple[float, ...]
    collective_iterations: int
    storage_mb: int
    membw_mb: int
    model_checks: bool
    """Build the run's model and train a few steps (needs --config)."""


# Quick stays under two minutes per node (DCGM r1 takes about a minute).
LEVELS = {
    "quick": Level(10, 1, (1, 16, 64), 10, 512, 1024, False),
    "standard": Level(60, 2, (1, 16, 64, 256), 20, 2048, 2048, True),
    "long": Level(300, 3, (1, 16, 64, 256, 1024), 50, 8192, 4096, True),
}
# Without a GPU the same checks run at CPU scale.
CPU_COLLECTIVE_SIZES_MB = (0.0625, 1, 4)
CPU_MEMBW_MB = 256


@dataclass
class PreflightOptions:
    level: str = "quick"
    config: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    burn_seconds: Optional[float] = None
    gemm_size: Optional[int] = None
    gemm_tolerance: float = 0.10
    straggler_tolerance: float = 0.20
    min_membw_gbps: Optional[float] = None
    min_busbw_gbps: Optional[float] = None
    min_read_gbps: float = 0.5
    min_write_gbps: float = 0.2
    data_paths: list[str] = field(default_factory=list)
    checkpoint_dir: Optional[str] = None
    world_size: Optional[int] = None
    device_memory_gb: Optional[float] = None
    skip: list[str] = field(default_factory=list)
    throughput_tolerance: float = 0.8
    """training_throughput fails below this share of logging.expected_tokens_per_s_per_gpu."""
    expect_gpus: Optional[int] = None
    allow_cpu: bool = False

    def validate(self) -> None:
        if self.expect_gpus is not None and self.expect_gpus < 0:
            raise InputError(f"--expect-gpus must be >= 0, got {self.expect_gpus}")
        if self.level not in LEVELS:
            raise InputError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        unknown = sorted(set(self.skip) - set(CHECKS))
        if unknown:
            raise InputError(f"--skip: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")


def _gather(value):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def _data_files(options: PreflightOptions, config) -> list[Path]:
    files = []
    for raw in options.data_paths:
        path = Path(raw)
        files += sorted(path.glob("*.bin")) if path.is_dir() else [path]
    # The config's datasets, when this node is the job's (--world-size plans another job). Those
    # that are missing, or a root that cannot be resolved, are data_audit's failures to report.
    if config is not None and not options.data_paths and options.world_size is None:
        from megasmol.config.typed import ConfigError
        from megasmol.data.recipe import load_recipe

        try:
            recipe = load_recipe(config.recipe_reference())
            root = config.data.root and str(config.path(config.data.root))
            prefixes = [recipe.dataset_prefix(entry, root) for stage in recipe.stages
                        for entry in stage.datasets]
        except ConfigError:
            prefixes = []
        for prefix in prefixes:
            candidate = Path(f"{prefix}.bin")
            if candidate.is_file() and candidate not in files:
                files.append(candidate)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise InputError(f"--data-path: no such file(s): {', '.join(missing[:3])}")
    return files


@dataclass
class Run:
    """What every check sees: the options, the config, the level and this rank."""

    options: PreflightOptions
    config: object
    level: Level
    info: object
    """This rank (``runtime.distributed.init_distributed``'s answer)."""
    data_files: list[Path]
    me: str
    """This rank's name in the report: ``rank R host:device``."""
    on_gpu: bool


@dataclass(frozen=True)
class Check:
    """One check, named once: what each rank measures, and how the report judges them all."""

    name: str
    report: Callable[[Run, dict], list]
    """Every rank: the check's rows, given each rank's measurement (rank name -> (who, data)).
    Checks without ``measure`` do their own (collective) work here."""
    measure: Optional[Callable[[Run], object]] = None
    """This rank's own measurement, made before the measurements are exchanged."""
    per_node: bool = False
    """Measured by one rank per node (local rank 0) only."""


def _measure_visibility(run: Run):
    # --world-size dry-runs the config for another job: this machine need not be its node.
    on_this_node = run.config is not None and run.options.world_size is None
    precision = run.config.training.precision if on_this_node else None
    needed = visibility.required_gpus(run.options.expect_gpus, precision, run.options.allow_cpu)
    why = "--expect-gpus" if run.options.expect_gpus is not None else f"training.precision={precision}"
    return visibility.check_gpu_visibility(needed, why)


def _report_visibility(run: Run, everyone: dict) -> list:
    rows = []
    for name, data in everyone.values():
        row = data["gpu_visibility"]
        row.target = name
        rows.append(row)
    return rows


def _measure_gemm(run: Run):
    size = run.options.gemm_size or (8192 if run.on_gpu else 1024)
    dtype = torch.bfloat16 if run.on_gpu else torch.float32
    seconds = run.options.burn_seconds if run.options.burn_seconds is not None else run.level.burn_seconds
    burn = compute.gemm_burn(seconds, size, dtype)
    burn["plain_matmul_tflops"] = compute.matmul_reference(size, dtype)
    return burn


def _report_gemm(run: Run, everyone: dict) -> list:
    burns = {name: data["gemm"] for name, data in everyone.values()}
    return compute.judge_burns(burns, run.options.gemm_tolerance)


def _measure_membw(run: Run):
    return compute.memory_bandwidth(run.level.membw_mb if run.on_gpu else CPU_MEMBW_MB)


def _report_membw(run: Run, everyone: dict) -> list:
    return [compute.judge_bandwidth(name, data["memory_bandwidth"], run.options.min_membw_gbps)
            for name, data in everyone.values()]


def _report_nvml(run: Run, everyone: dict) -> list:
    healths = {name: data["nvml"] for name, data in everyone.values()}
    rows = [nvml_health.judge_health(name, h) for name, h in healths.items()]
    drivers = nvml_health.judge_drivers(healths)
    return rows + ([drivers] if drivers is not None else [])


def _measure_dcgm(run: Run):
    # Whatever torch sees: DCGM may find a failed GPU that torch cannot even open.
    return dcgm.run_dcgm(run.level.dcgm_level, timeout_s=3600)


def _measure_storage(run: Run):
    options, config = run.options, run.config
    # --world-size plans another job: its data are read, and its checkpoints written, on its
    # nodes, so nothing of the config's is touched here (a --data-path / --checkpoint-dir given
    # on the command line is still tested: that one was asked for).
    planning = config is not None and options.world_size is not None
    ckpt = Path(options.checkpoint_dir) if options.checkpoint_dir else (
        config.checkpoint_dir if config is not None and not planning else None)
    why = {}
    if planning and not options.data_paths:
        why["no_data_why"] = "--world-size plans another job: its data are read on its nodes"
    if planning and not options.checkpoint_dir:
        why["no_checkpoint_why"] = ("nothing written (--world-size plans another job: its "
                                    "checkpoints go to its storage; --checkpoint-dir DIR times a "
                                    "directory here)")
    return storage.storage_checks(run.data_files, ckpt, run.level.storage_mb, options.min_read_gbps,
                                  options.min_write_gbps, **why)


def _node_rows(key: str) -> Callable[[Run, dict], list]:
    """Rows measured once per node, each named after its host."""
    def report(run: Run, everyone: dict) -> list:
        rows = []
        for name, data in everyone.values():
            for row in data.get(key, []):
                if row.target == "node":
                    row.target = name.split(":")[0].split(" ", 2)[-1]  # the host
                rows.append(row)
        return rows
    return report


def _report_data_audit(run: Run, everyone: dict) -> list:
    # Once, on rank 0: it reads every dataset's tokens.
    audit = (data_check.data_audit(run.config, run.options.world_size is not None)
             if run.info.rank == 0 else None)
    return _gather(audit)[0]


def _report_collectives(run: Run, everyone: dict) -> list:
    sizes = list(run.level.collective_sizes_mb if run.on_gpu else CPU_COLLECTIVE_SIZES_MB)
    return collectives.collective_checks(sizes, run.level.collective_iterations,
                                         run.options.straggler_tolerance, run.options.min_busbw_gbps)


def _report_dry_run(run: Run, everyone: dict) -> list:
    if run.config is None:
        return [skipped("dry_run", "no --config given", "config")]
    return dryrun.dry_run(run.config, run.options.world_size or run.info.world_size,
                          run.options.device_memory_gb)


def _model_check_skipped(run: Run, name: str) -> list:
    """The model checks build the run's model on this node (every rank takes part; see
    model_check.py): not without a config, below --level standard, or for another job."""
    why = ("no --config given" if run.config is None else
           "--world-size dry-runs another job's config" if run.options.world_size is not None
           else None if run.level.model_checks
           else f"runs at --level standard or long (this is {run.options.level})")
    return [skipped(name, why, "model")] if why else []


def _report_model_parity(run: Run, everyone: dict) -> list:
    from megasmol.preflight import model_check

    if (skip := _model_check_skipped(run, "model_parity")):
        return skip
    try:
        mine = model_check.model_parity(run.config)
    except Exception as exc:  # a kernel that fails to build or run is the finding
        mine = model_check.CheckResult("model_parity", "fail", f"could not run: {exc}", "model")
    rows = []
    for name, row in _gather((run.me, mine)):
        row.target = name
        rows.append(row)
    return rows


def _report_training_throughput(run: Run, everyone: dict) -> list:
    from megasmol.preflight import model_check

    if (skip := _model_check_skipped(run, "training_throughput")):
        return skip
    burn = everyone.get(f"rank {run.info.rank}", (None, {}))[1].get("gemm")
    try:
        row = model_check.training_throughput(run.config, tolerance=run.options.throughput_tolerance,
                                              burn_tflops=burn["mean_tflops"] if burn else None)
    except Exception as exc:
        row = model_check.CheckResult("training_throughput", "fail",
                                      f"the run's first steps failed: {exc}", "model")
    return [_gather(row)[0]]  # rank 0's timing; every rank ran the same steps


CHECK_TABLE = (
    Check("gpu_visibility", _report_visibility, _measure_visibility),
    Check("gemm", _report_gemm, _measure_gemm),
    Check("memory_bandwidth", _report_membw, _measure_membw),
    Check("nvml", _report_nvml, lambda run: nvml_health.read_health()),
    Check("dcgm", _node_rows("dcgm"), _measure_dcgm, per_node=True),
    Check("storage", _node_rows("storage"), _measure_storage, per_node=True),
    Check("data_audit", _report_data_audit),
    Check("collectives", _report_collectives),
    Check("dry_run", _report_dry_run),
    Check("model_parity", _report_model_parity),
    Check("training_throughput", _report_training_throughput),
)
"""Every check, in the report's order."""
CHECKS = tuple(check.name for check in CHECK_TABLE)


def run_preflight(options: PreflightOptions) -> PreflightReport:
    from megasmol.runtime.distributed import init_distributed

    options.validate()
    config = None
    if options.config:
        from megasmol.config.run import load_run_config

        config = load_run_config(options.config, options.overrides)
    # Bad paths are found on every rank before any collective, so all ranks stop together.
    data_files = _data_files(options, config) if "storage" not in options.skip else []
    info = init_distributed()
    host = socket.gethostname()
    run = Run(options, config, LEVELS[options.level], info, data_files,
              f"rank {info.rank} {host}:{current_device()}", torch.cuda.is_available())
    report = PreflightReport(host=host if info.world_size == 1 else f"{host} +{info.world_size - 1} rank(s)",
                             level=options.level)
    checks = [check for check in CHECK_TABLE if check.name not in options.skip]
    mine = {check.name: check.measure(run) for check in checks
            if check.measure is not None and (not check.per_node or info.local_rank == 0)}
    everyone = dict(zip([f"rank {r}" for r in range(info.world_size)], _gather((run.me, mine))))
    for check in checks:
        report.extend(check.report(run, everyone))
    return report
