"""Collectives across every rank of the job, and the rank that holds the others back.

Bus bandwidth follows nccl-tests: all-reduce moves ``2 (n-1) / n`` of the buffer through each
rank's link, all-gather and reduce-scatter ``(n-1) / n``; busbw = algbw x that factor, so the
figure is comparable across job sizes and with the hardware's link speed.

Stragglers: every rank times the same local workload (GEMMs on its device) and the times are
gathered; a rank more than the tolerance above the median and a standard deviation above the
mean is named. A thermally throttled GPU shows up here before it slows every all-reduce.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from megasmol.preflight.compute import _sync, timed_matmuls
from megasmol.preflight.report import CheckResult, skipped, slow_outliers
from megasmol.runtime.distributed import current_device as device

BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}
SLOW_RANK_KNOB = "MEGASMOL_PREFLIGHT_SLOW_RANK"
"""Test-only: ``RANK:SECONDS`` makes that rank's timed workload that much slower."""


def _run(op: str, nbytes: int, world: int):
    dev = device()
    count = max(world, nbytes // 4 // world * world)
    if op == "all_reduce":
        buf = torch.ones(count, device=dev)
        return lambda: dist.all_reduce(buf)
    if op == "all_gather":
        shard = torch.ones(count // world, device=dev)
        out = torch.empty(count, device=dev)
        return lambda: dist.all_gather_into_tensor(out, shard)
    full = torch.ones(count, device=dev)
    shard = torch.empty(count // world, device=dev)
    return lambda: dist.reduce_scatter_tensor(shard, full)


def bus_bandwidth(sizes_mb: list[float], iterations: int) -> dict:
    """{op: {size_mb: busbw GB/s}} measured on every rank (collective)."""
    world = dist.get_world_size()
    table: dict[str, dict[float, float]] = {}
    for op in BUS_FACTOR:
        table[op] = {}
        for size in sizes_mb:
            nbytes = int(size * 1024 * 1024)
            call = _run(op, nbytes, world)
            call()
            _sync()
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iterations):
                call()
            _sync()
            seconds = (time.perf_counter() - t0) / iterations
            table[op][size] = nbytes / seconds / 1e9 * BUS_FACTOR[op](world)
    return table


def local_workload_seconds(size: int = 512, repeats: int = 20) -> float:
    """Time of a fixed local GEMM workload on this rank (plus the test-only slow-down)."""
    seconds = timed_matmuls(size, torch.float32, repeats)
    knob = os.environ.get(SLOW_RANK_KNOB, "")
    if knob:
        rank, _, delay = knob.partition(":")
        if int(rank) == dist.get_rank():
            time.sleep(float(delay))
            seconds += float(delay)
    return seconds


def collective_checks(sizes_mb: list[float], iterations: int, tolerance: float,
                      min_busbw_gbps: Optional[float]) -> list[CheckResult]:
    """Collective: every rank calls it; every rank gets the same rows."""
    if not dist.is_initialized() or dist.get_world_size() < 2:
        return [skipped("collectives", "a single process (run under torchrun/srun to test the job)", "job")]
    world = dist.get_world_size()
    table = bus_bandwidth(sizes_mb, iterations)
    rows = []
    largest = max(sizes_mb)
    for op, by_size in table.items():
        sweep = ", ".join(f"{s:g} MB {bw:.2f}" for s, bw in by_size.items())
        top = by_size[largest]
        status = "pass" if min_busbw_gbps is None or top >= min_busbw_gbps else "fail"
        note = "" if min_busbw_gbps is None else (
            f" ({'>=' if status == 'pass' else '<'} {min_busbw_gbps} GB/s)")
        rows.append(CheckResult("collectives", status,
                                f"{op} busbw {top:.2f} GB/s at {largest:g} MB{note}; sweep {sweep}",
                                f"job ({world} ranks, {dist.get_backend()})",
                                {"op": op, "busbw_gbps": {str(k): v for k, v in by_size.items()}}))
    # The best of five runs: a rank that is always slow stays slow; one-off noise does not count.
    mine = min(local_workload_seconds() for _ in range(5))
    times = [None] * world
    dist.all_gather_object(times, mine)
    per_rank = {f"rank {r}": t for r, t in enumerate(times)}
    slow = slow_outliers(per_rank, tolerance)
    median = sorted(times)[(world - 1) // 2]
    summary = (f"local workload {min(times) * 1e3:.0f}-{max(times) * 1e3:.0f} ms across ranks "
               f"(median {median * 1e3:.0f} ms)")
    if slow:
        summary += " -- slow: " + ", ".join(f"{r} ({per_rank[r] / median:.1f}x median)" for r in slow)
    rows.append(CheckResult("stragglers", "fail" if slow else "pass", summary, "job",
                            {"seconds_per_rank": per_rank, "slow": slow, "tolerance": tolerance}))
    return rows
