"""Start torch.distributed and Megatron-Core's parallel state for one job.

Reads the launcher's environment (torchrun: RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/PORT;
Slurm's srun: SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) and falls back to a single process.
NCCL on GPUs, gloo on CPU (where the CPU compatibility layer is switched on first).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megasmol.config.parallel import ParallelLayout
from megasmol.errors import RunFailure
from megasmol.runtime import cpu_compat


@dataclass
class RankInfo:
    rank: int
    world_size: int
    local_rank: int


def rank_info_from_env(env=os.environ) -> RankInfo:
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return RankInfo(
            int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
        )
    return RankInfo(0, 1, 0)


_launcher_store = None
"""The launcher's rendezvous store, kept for the process's later process groups (in-process
restarts: each one's group takes its own prefix in it)."""


def _attempt_store(info: RankInfo, prefix: str, timeout: datetime.timedelta):
    """A store for one attempt's default process group: the launcher's (torchrun's agent store, or
    rank 0's TCP store under srun, made once per process and kept) under ``prefix``, so a group
    rebuilt in the same processes never reads the keys of the one before."""
    global _launcher_store
    if _launcher_store is None:
        if info.world_size == 1 and "MASTER_ADDR" not in os.environ:
            _launcher_store = torch.distributed.HashStore()
        else:
            addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "29500")
            url = f"tcp://{addr}:{port}"
            _launcher_store, _, _ = next(torch.distributed.rendezvous(
                url, rank=info.rank, world_size=info.world_size, timeout=timeout))
    return torch.distributed.PrefixStore(prefix, _launcher_store)


def init_distributed(timeout_s: float | None = None, store_prefix: str | None = None) -> RankInfo:
    """Initialize torch.distributed once (idempotent).

    ``timeout_s`` bounds every collective: a peer that froze makes the others fail with an
    error after that long instead of waiting forever (torch's default is 10 or 30 minutes).
    ``store_prefix``: the group's keys go under this prefix of the launcher's store, kept for the
    process (in-process restart gives each attempt its own)."""
    cpu_compat.activate_if_needed()
    info = rank_info_from_env()
    if torch.distributed.is_initialized():
        return RankInfo(torch.distributed.get_rank(), torch.distributed.get_world_size(),
                        info.local_rank)
    if store_prefix is not None:
        rendezvous = {"store": _attempt_store(info, store_prefix, datetime.timedelta(
            seconds=timeout_s if timeout_s is not None else 300))}
    elif info.world_size == 1 and "MASTER_ADDR" not in os.environ:
        # A lone process: an in-memory store, no port to race for, and nothing set in the
        # environment that child processes (e.g. a torchrun launched from here) inherit.
        rendezvous = {"store": torch.distributed.HashStore()}
    else:
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
        rendezvous = {"init_method": f"tcp://{addr}:{os.environ.get('MASTER_PORT', '29500')}"}
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    kwargs = {} if timeout_s is None else {"timeout": datetime.timedelta(seconds=timeout_s)}
    torch.distributed.init_process_group(
        backend=backend, rank=info.rank, world_size=info.world_size, **rendezvous, **kwargs)
    atexit.unregister(_shutdown_at_exit)  # one registration, however often a process re-inits
    atexit.register(_shutdown_at_exit)
    _record_peers()
    return info


def _shutdown_at_exit() -> None:
    """A process that ends without :func:`shutdown` (a script, a notebook, a test) still tears its
    groups down before the interpreter does: gloo's groups destroyed during interpreter finalization
    aborted such a process now and then ("terminate called without an active exception"; 6 of
    300 single-process runs on a 2-core machine). No farewell barrier: the peers may be gone."""
    shutdown(peers_reachable=False)


_peers: list[tuple[str, int]] = []  # (host, pid) of every rank, for naming a lost one


def _record_peers() -> None:
    global _peers
    me = (socket.gethostname(), os.getpid())
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, me)
    _peers = [tuple(p) for p in gathered]


def _process_state(pid: int) -> str | None:
    """'stopped', 'gone' or None (running) for a process on this host."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return "gone"
    except OSError:
        return None
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(fields[0])


class PeerLost(RunFailure, RuntimeError):
    """A collective failed because another rank died or stopped answering."""

    def __init__(self, message: str, reported: bool = False):
        super().__init__(message)
        self.reported = reported
        """Already printed (``megasmol train`` says it before shutting down)."""


def describe_collective_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because of a peer, naming it where this host can
    see it; None when ``exc`` is not such a failure."""
    text = str(exc)
    timed_out = "Timed out" in text or "timed out" in text or "Timeout" in text
    lost = any(m in text for m in ("Connection closed by peer", "Connection reset by peer",
                                   "Broken pipe", "Connection refused", "EOF"))
    if not (timed_out or lost):
        return None
    host = socket.gethostname()
    local = [(r, pid) for r, (h, pid) in enumerate(_peers) if h == host and pid != os.getpid()]
    named = []
    # A killed peer closes its sockets before it leaves /proc: give it a moment to show as gone.
    for _ in range(20 if lost and local else 1):
        named = [f"rank {r} ({state})" for r, pid in local if (state := _process_state(pid))]
        if named:
            break
        time.sleep(0.1)
    who = ", ".join(named) if named else "a rank on another host (see that host's log)"
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if timed_out:
        return (f"rank {rank}: a collective timed out: {who} stopped answering; the job ends "
                "instead of hanging (training.collective_timeout_s sets how long to wait)")
    return f"rank {rank}: lost {who}: the connection to it closed during a collective"


def current_device() -> torch.device:
    """This process's compute device: its CUDA device, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_parallel(layout: ParallelLayout, spec=None, seed: int = 1234,
                  seq_length: int | None = None, timeout_s: float | None = None) -> RankInfo:
    """torch.distributed + Megatron parallel_state + per-rank RNG streams."""
    info = init_distributed(timeout_s)
    layout.check(info.world_size, spec, seq_length)
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    with cpu_compat.one_group_for_one_process():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tensor_parallel,
            pipeline_model_parallel_size=layout.pipeline_parallel,
            context_parallel_size=layout.context_parallel,
            # Megatron makes timedelta(minutes=...) of it: a fraction of a minute works too.
            **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}),
        )
    set_seed(seed)
    return info


def set_seed(seed: int) -> None:
    """Same default stream within a data-parallel replica; a distinct stream per TP rank.

    The playbook's TP seed bug: every TP rank initialising its shard from the same seed gives
    correlated shards.  Megatron-Core's tracker gives TP rank r the seed ``seed + 2718 + r``
    for everything drawn inside ``get_cuda_rng_tracker().fork()`` (weight init, TP dropout).
    """
    import random

    import numpy as np
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    # Pipeline stages hold different layers: offset so they are not initialised alike.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    model_parallel_cuda_manual_seed(stage_seed)


def shutdown(peers_reachable: bool = True) -> None:
    """Tear down Megatron's and torch's process groups; ``peers_reachable=False`` after a
    failure skips the farewell barrier, which would wait out the timeout for a lost peer.
    A process that never loaded Megatron-Core (``eval tasks --hf``, ``chat --hf``) does not
    import it here: that alone took a second."""
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        with contextlib.suppress(Exception):
            parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        if peers_reachable:
            with contextlib.suppress(Exception):
                torch.distributed.barrier()
        with contextlib.suppress(Exception):
            torch.distributed.destroy_process_group()
