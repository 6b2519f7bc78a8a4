"""What each rank saw of a fault under in-process restart (``train/inprocess.py``), and the one
line that says what happened: which rank, and how, from every rank's note and NVRx's records."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass
class FaultNote:
    """What one rank saw of a fault, kept across attempts and gathered by the next one."""

    rank: int
    """This rank's rank in the attempt that failed (NVRx's records name ranks so)."""
    at: float
    """``time.time()`` when this rank's clean-up began (the fault was noticed)."""
    raised: str
    """This rank's own exception, one line ("" when it was interrupted without one)."""
    nvrx: str
    """NVRx's attribution: which ranks caused the restart and how (``Interruption.EXCEPTION on
    ranks={1}``)."""
    peer: bool = False
    """This rank's own error was a collective failing for a peer (the peer is the fault)."""
    lost: list[int] = field(default_factory=list)
    """The ranks NVRx lost (terminated after the hard timeout, or their process ended): known
    after the restart barrier, and not always in ``nvrx`` (NVRx keeps only the records made
    before the first rank acted on them)."""


_KINDS = {  # the most telling first: a rank is described by the first kind recorded for it
    "HARD_TIMEOUT": "was terminated after resilience.hard_timeout_s (frozen)",
    "LOST": ("was lost (its process ended: killed, or terminated by NVRx after "
             "resilience.hard_timeout_s without progress)"),
    "UNRESPONSIVE": "stopped answering (no heartbeat for resilience.heartbeat_timeout_s)",
    "TERMINATED": "was terminated (its process ended)",
    "MONITOR_PROCESS_EXCEPTION": "lost its NVRx monitor process",
    "SOFT_TIMEOUT": "made no progress for resilience.soft_timeout_s",
    "EXCEPTION": "raised",
    "BASE_EXCEPTION": "was interrupted",
}


def describe_fault(notes: list[FaultNote]) -> str:
    """The fault in words, from every rank's note: NVRx names the ranks and how (each rank once,
    by the most telling record); a rank that raised says what, and a rank whose collective only
    failed for that peer is left out."""
    nvrx = max((n.nvrx for n in notes), key=len, default="")  # the fullest record
    raised = {n.rank: n.raised for n in notes if n.raised}
    secondary = {n.rank for n in notes if n.peer}
    order = list(_KINDS)

    def weight(kind: str) -> int:
        return order.index(kind) if kind in order else len(order)

    kinds: dict[int, str] = {}
    for kind, ranks in re.findall(r"Interruption\.(\w+) on ranks=\{([\d, ]*)\}", nvrx):
        for rank in (int(r) for r in ranks.split(",") if r.strip()):
            if rank not in kinds or weight(kind) < weight(kinds[rank]):
                kinds[rank] = kind
    lost = sorted({r for n in notes for r in n.lost})
    for rank in lost:
        if weight(kinds.get(rank, "EXCEPTION")) >= weight("EXCEPTION"):
            kinds[rank] = "LOST"
    primary = {r: k for r, k in kinds.items() if k != "EXCEPTION" or r not in secondary}
    parts = []
    for rank, kind in sorted((primary or kinds).items(), key=lambda rk: (weight(rk[1]), rk[0])):
        what = f"rank {rank} {_KINDS.get(kind, kind.lower())}"
        if kind == "EXCEPTION" and raised.get(rank):
            what += f" {raised[rank]}"
        parts.append(what)
    return "; ".join(parts) or nvrx or "a rank failed"
