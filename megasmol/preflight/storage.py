"""Storage: sequential read speed of the training data and write speed of the checkpoint dir.

A dataset on a store that cannot keep up stalls the whole job (the playbook's first production
surprise). Reads drop the page cache for each file first (``posix_fadvise DONTNEED``) so the
figure is the device's, not memory's; writes are fsync'ed.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Optional

from megasmol.preflight.report import CheckResult, skipped

CHUNK = 8 * 1024 * 1024
MIN_TIMED_MB = 64
"""Less data than this reads in milliseconds, from caches the page-cache drop does not reach: its
speed says nothing about the store, so it is reported and not judged."""


def read_throughput(files: list[Path], budget_mb: int, seed: int = 0) -> dict:
    files = list(files)
    random.Random(seed).shuffle(files)
    budget, total, used = budget_mb * 1024 * 1024, 0, []
    t0 = time.perf_counter()
    for path in files:
        if total >= budget:
            break
        with open(path, "rb", buffering=0) as fh:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            while total < budget:
                chunk = fh.read(CHUNK)
                if not chunk:
                    break
                total += len(chunk)
        used.append(str(path))
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "gbps": total / max(seconds, 1e-9) / 1e9, "files": used}


def write_throughput(directory: Path, megabytes: int) -> dict:
    """Time an fsync'ed write of ``megabytes`` in ``directory``; the file, and every directory
    made for it (a run's checkpoint directory before its first save), are removed afterwards."""
    directory = Path(directory)
    made = [p for p in (directory, *directory.parents) if not p.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".megasmol-preflight-{os.getpid()}.tmp"
    block = os.urandom(CHUNK)
    total = 0
    t0 = time.perf_counter()
    try:
        with open(path, "wb", buffering=0) as fh:
            while total < megabytes * 1024 * 1024:
                total += fh.write(block)
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t0
    finally:
        path.unlink(missing_ok=True)
        for created in made:  # innermost first; one something else wrote into stays
            try:
                created.rmdir()
            except OSError:
                break
    return {"bytes": total, "seconds": seconds, "gbps": total / max(seconds, 1e-9) / 1e9}


def _judge(check: str, target: str, result: dict, minimum: float, verb: str) -> CheckResult:
    megabytes = result["bytes"] / 1e6
    if megabytes < MIN_TIMED_MB:
        return CheckResult(check, "skip", f"{verb} {megabytes:.1f} MB at {result['gbps']:.2f} GB/s: too "
                           f"little to time (under {MIN_TIMED_MB} MB), not judged", target,
                           {**result, "min_gbps": minimum})
    ok = result["gbps"] >= minimum
    summary = (f"{verb} {result['bytes'] / 1e6:.0f} MB at {result['gbps']:.2f} GB/s "
               f"({'>=' if ok else 'below'} {minimum} GB/s)")
    return CheckResult(check, "pass" if ok else "fail", summary, target, {**result, "min_gbps": minimum})


def storage_checks(data_files: list[Path], checkpoint_dir: Optional[Path], budget_mb: int,
                   min_read_gbps: float, min_write_gbps: float,
                   no_data_why: str = "give --config or --data-path; a config's missing files fail "
                                      "data_audit",
                   no_checkpoint_why: str = "no checkpoint directory (give --config or "
                                            "--checkpoint-dir)") -> list[CheckResult]:
    rows = []
    if data_files:
        result = read_throughput(data_files, budget_mb)
        target = str(Path(data_files[0]).parent)
        rows.append(_judge("storage_read", target, result, min_read_gbps, "read"))
    else:
        rows.append(skipped("storage_read", f"no data files to read ({no_data_why})"))
    if checkpoint_dir is not None:
        result = write_throughput(checkpoint_dir, budget_mb)
        rows.append(_judge("storage_write", str(checkpoint_dir), result, min_write_gbps, "wrote"))
    else:
        rows.append(skipped("storage_write", no_checkpoint_why))
    return rows
