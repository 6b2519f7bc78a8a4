"""Run every check on every rank of the job and assemble one report (the same on all ranks).

Per-device checks (GEMM burn, memory bandwidth, NVML) run on each rank for its own device;
storage runs once per node (local rank 0); collectives and stragglers involve every rank; the
config dry-run is reported once. Results are exchanged with ``all_gather_object``, so every rank
returns the same exit code and ``srun megasmol preflight && srun megasmol train`` gates a job.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megasmol.preflight import (collectives, compute, data_check, dcgm, dryrun, nvml_health, storage,
                                visibility)
from megasmol.preflight.report import PreflightReport, skipped
from megasmol.runtime.distributed import current_device

CHECKS = ("gpu_visibility", "gemm", "memory_bandwidth", "nvml", "dcgm", "collectives", "storage",
          "data_audit", "dry_run", "model_parity", "training_throughput")
MODEL_CHECKS = ("model_parity", "training_throughput")


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
            raise ValueError(f"--expect-gpus must be >= 0, got {self.expect_gpus}")
        if self.level not in LEVELS:
            raise ValueError(f"--level must be one of {', '.join(LEVELS)}, got {self.level!r}")
        unknown = sorted(set(self.skip) - set(CHECKS))
        if unknown:
            raise ValueError(f"--skip: unknown check(s) {', '.join(unknown)}; known: {', '.join(CHECKS)}")


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
        raise ValueError(f"--data-path: no such file(s): {', '.join(missing[:3])}")
    return files


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
    level = LEVELS[options.level]
    on_gpu = torch.cuda.is_available()
    host = socket.gethostname()
    dev = current_device()
    me = f"rank {info.rank} {host}:{dev}"
    report = PreflightReport(host=host if info.world_size == 1 else f"{host} +{info.world_size - 1} rank(s)",
                             level=options.level)

    mine: dict[str, object] = {}
    if "gpu_visibility" not in options.skip:
        # --world-size dry-runs the config for another job: this machine need not be its node.
        on_this_node = config is not None and options.world_size is None
        precision = config.training.precision if on_this_node else None
        needed = visibility.required_gpus(options.expect_gpus, precision, options.allow_cpu)
        why = ("--expect-gpus" if options.expect_gpus is not None
               else f"training.precision={precision}")
        mine["gpu_visibility"] = visibility.check_gpu_visibility(needed, why)
    if "gemm" not in options.skip:
        size = options.gemm_size or (8192 if on_gpu else 1024)
        dtype = torch.bfloat16 if on_gpu else torch.float32
        seconds = options.burn_seconds if options.burn_seconds is not None else level.burn_seconds
        burn = compute.gemm_burn(seconds, size, dtype)
        burn["plain_matmul_tflops"] = compute.matmul_reference(size, dtype)
        mine["gemm"] = burn
    if "memory_bandwidth" not in options.skip:
        mine["membw"] = compute.memory_bandwidth(level.membw_mb if on_gpu else CPU_MEMBW_MB)
    if "nvml" not in options.skip:
        mine["nvml"] = nvml_health.read_health()
    if "storage" not in options.skip and info.local_rank == 0:
        ckpt = Path(options.checkpoint_dir) if options.checkpoint_dir else (
            config.checkpoint_dir if config is not None else None)
        why = ({"no_data_why": "--world-size plans another job: its data are read on its nodes"}
               if config is not None and options.world_size is not None and not options.data_paths else {})
        mine["storage"] = storage.storage_checks(data_files, ckpt, level.storage_mb,
                                                 options.min_read_gbps, options.min_write_gbps, **why)
    if "dcgm" not in options.skip and info.local_rank == 0:
        # Whatever torch sees: DCGM may find a failed GPU that torch cannot even open.
        mine["dcgm"] = dcgm.run_dcgm(level.dcgm_level, timeout_s=3600)
    everyone = dict(zip([f"rank {r}" for r in range(info.world_size)], _gather((me, mine))))

    if "gpu_visibility" not in options.skip:
        for name, data in everyone.values():
            row = data["gpu_visibility"]
            row.target = name
            report.add(row)
    if "gemm" not in options.skip:
        burns = {name: data["gemm"] for name, data in everyone.values()}
        report.extend(compute.judge_burns(burns, options.gemm_tolerance))
    if "memory_bandwidth" not in options.skip:
        report.extend(compute.judge_bandwidth(name, data["membw"], options.min_membw_gbps)
                      for name, data in everyone.values())
    if "nvml" not in options.skip:
        healths = {name: data["nvml"] for name, data in everyone.values()}
        report.extend(nvml_health.judge_health(name, h) for name, h in healths.items())
        drivers = nvml_health.judge_drivers(healths)
        if drivers is not None:
            report.add(drivers)
    for key in ("dcgm", "storage"):
        for name, data in everyone.values():
            for row in data.get(key, []):
                if row.target == "node":
                    row.target = name.split(":")[0].split(" ", 2)[-1]  # the host
                report.add(row)
    if "data_audit" not in options.skip:  # once, on rank 0: it reads every dataset's tokens
        audit = data_check.data_audit(config, options.world_size is not None) if info.rank == 0 else None
        report.extend(_gather(audit)[0])
    if "collectives" not in options.skip:
        sizes = list(level.collective_sizes_mb if on_gpu else CPU_COLLECTIVE_SIZES_MB)
        report.extend(collectives.collective_checks(sizes, level.collective_iterations,
                                                    options.straggler_tolerance, options.min_busbw_gbps))
    if "dry_run" not in options.skip:
        if config is None:
            report.add(skipped("dry_run", "no --config given", "config"))
        else:
            report.extend(dryrun.dry_run(config, options.world_size or info.world_size,
                                         options.device_memory_gb))
    report.extend(_model_checks(options, config, level, info, me, mine.get("gemm")))
    return report


def _model_checks(options: PreflightOptions, config, level: Level, info, me: str, burn) -> list:
    """The run's model on this node (every rank takes part); see model_check.py."""
    from megasmol.preflight import model_check

    wanted = [c for c in MODEL_CHECKS if c not in options.skip]
    if not wanted:
        return []
    if config is None or not level.model_checks or options.world_size is not None:
        why = ("no --config given" if config is None else
               "--world-size dry-runs another job's config" if options.world_size is not None
               else f"runs at --level standard or long (this is {options.level})")
        return [skipped(c, why, "model") for c in wanted]
    rows = []
    if "model_parity" in wanted:
        try:
            mine = model_check.model_parity(config)
        except Exception as exc:  # a kernel that fails to build or run is the finding
            mine = model_check.CheckResult("model_parity", "fail", f"could not run: {exc}", "model")
        for name, row in _gather((me, mine)):
            row.target = name
            rows.append(row)
    if "training_throughput" in wanted:
        burn_tflops = burn["mean_tflops"] if burn else None
        try:
            row = model_check.training_throughput(config, tolerance=options.throughput_tolerance,
                                                  burn_tflops=burn_tflops)
        except Exception as exc:
            row = model_check.CheckResult("training_throughput", "fail",
                                          f"the run's first steps failed: {exc}", "model")
        rows.append(_gather(row)[0])  # rank 0's timing; every rank ran the same steps
    return rows

