"""A run whose ``checkpoint.dir`` is ``s3://bucket/prefix`` (``ckpt/remote.py`` has the layout).

Checkpoints are written exactly as a local run writes them, into ``checkpoint.staging_dir``
(at disk speed; with ``async_save``, in the background), and rank 0 uploads each committed one on
a thread of its own, one at a time, so training goes on while it uploads. The bucket's ``latest``
moves once every object is uploaded and verified; an upload that fails or is cut short leaves the
previous one, and says so in one line.

Before the model is built, :func:`prepare` checks the bucket (it exists, is reachable, these
credentials may write there, it holds no other run's checkpoints: one line naming
``checkpoint.dir`` within seconds), brings the bucket's latest checkpoint into the staging
directory when the local copy is missing or older (so the resume reads it as a local one), and
uploads a local checkpoint that is newer than the bucket's (a previous upload did not finish).
An ``s3://`` ``checkpoint.init_from`` or ``branch_from`` is downloaded there too (into the
local cache: ``remote.fetch``).
"""

from __future__ import annotations

import json
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from megasmol.ckpt.branch import fetch_source
from megasmol.ckpt.checkpoint import is_complete
from megasmol.ckpt.object_store import UploadFailed
from megasmol.ckpt.remote import RemoteCheckpoints, fetch
from megasmol.errors import UserError
from megasmol.utils.faults import NO_FAULTS, FaultPlan
from megasmol.utils.fs import atomic_write_text, shown
from megasmol.utils.s3_url import StoreError, is_url

if TYPE_CHECKING:
    from megasmol.config.run import RunConfig

WHAT = "checkpoint.dir"
IDENTITY = (("model",), ("data", "recipe"))
"""What a prefix's checkpoints must share with this run to be its own (else: another run's)."""


def _step(name: Optional[str]) -> int:
    return int(name.removeprefix("iter_")) if name and name.startswith("iter_") else -1


def _field(tree: dict, path: tuple[str, ...]):
    node: object = tree
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _say(line: str) -> None:
    print(f"checkpoints: {line}", flush=True)


def _local_starts(config: RunConfig) -> dict[str, str]:
    """The local copies of an ``s3://`` ``checkpoint.init_from`` or ``branch_from`` (downloaded
    into the cache unless they are there): field name -> local path."""
    starts = {}
    init_from, branch_from = config.checkpoint.init_from, config.checkpoint.branch_from
    if init_from is not None and is_url(init_from):
        starts["init_from"] = str(fetch(init_from, "checkpoint.init_from"))
    if branch_from is not None and is_url(branch_from):
        starts["branch_from"] = fetch_source(branch_from)
    return starts


def _local_latest(staging: Path) -> Optional[str]:
    """The staging directory's checkpoint a resume takes: the one ``latest`` names when it is
    complete, else the newest complete one (what the local recovery moves ``latest`` to)."""
    named = (staging / "latest").read_text().strip() if (staging / "latest").is_file() else ""
    if named and is_complete(staging / named):
        return named
    complete = [p.name for p in staging.glob("iter_???????") if is_complete(p)]
    return max(complete, key=_step) if complete else None


def _on_rank0(config: RunConfig) -> dict[str, str]:
    """Rank 0's part of :func:`prepare`; returns :func:`_local_starts`."""
    local_starts = _local_starts(config)
    url = config.checkpoint_url
    if url is None:
        return local_starts
    remote = RemoteCheckpoints(url, WHAT)
    store = remote.store
    store.check_access(WHAT, write=True)
    try:
        named = (store.read_text("latest") or "").strip() or None
        latest = remote.latest()
        staging = config.checkpoint_dir
        local_file = staging / "latest"
        local = _local_latest(staging)
        if named is not None and latest is None and _step(local) < _step(named):
            done = remote.complete()
            raise StoreError(f"{WHAT}: {url}: latest names {named}, whose upload did not finish (no "
                             f"manifest){'; complete ones: ' + ', '.join(done[-3:]) if done else ''}: "
                             "point latest at a complete one, or give this run a new prefix")
        if latest is not None:
            meta = json.loads(store.read_text(f"{latest}/megasmol.json") or "{}")
            _check_same_run(url, latest, meta.get("run_config") or {}, config.to_dict())
        if config.checkpoint.resume and latest is not None and _step(latest) > _step(local):
            started = time.perf_counter()
            remote.download(latest, staging)
            atomic_write_text(local_file, latest + "\n")
            _say(f"downloaded {latest} from {url} to {shown(staging)} (the local copy was "
                 f"{'older: ' + local if local else 'missing'}; {time.perf_counter() - started:.1f}s)")
        elif local is not None and _step(local) > _step(latest):
            _say(f"the local {local} is newer than the bucket's latest ({latest or 'none'}): uploading it")
            try:
                remote.upload(staging / local)
            except UploadFailed as exc:
                raise UploadFailed(f"{WHAT}: uploading the local {local} failed: {exc}; the bucket's "
                                   f"latest stays {latest or 'none'}") from None
    except store._errors() as exc:
        raise StoreError(f"{WHAT}: {url}: {store.describe(exc)}") from None
    return local_starts


def _check_same_run(url: str, latest: str, saved: dict, current: dict) -> None:
    differ = [(".".join(path), _field(saved, path), _field(current, path)) for path in IDENTITY
              if _field(saved, path) != _field(current, path)]
    if differ:
        said = "; ".join(f"{name} {old!r} there, {new!r} here" for name, old, new in differ)
        raise StoreError(f"{WHAT}: {url} holds another run's checkpoints ({latest}: {said}): give "
                         "this run its own prefix")


def prepare(config: RunConfig) -> None:
    """Collective, before the model is built (module docstring). Every rank raises the same
    error. An ``s3://`` ``checkpoint.init_from`` or ``branch_from`` is replaced by its local
    copy."""
    if config.checkpoint_url is None and not any(
            is_url(v) for v in (config.checkpoint.init_from, config.checkpoint.branch_from)):
        return
    rank0 = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    verdict: list = [None]
    if rank0:
        try:
            verdict = [("ok", _on_rank0(config))]
        except (UserError, UploadFailed) as exc:
            verdict = [("user" if isinstance(exc, UserError) else "failed", str(exc))]
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.broadcast_object_list(verdict, src=0)
    kind, value = verdict[0]
    if kind == "user":
        raise StoreError(value)
    if kind == "failed":
        raise UploadFailed(value)
    for field, local in value.items():  # the downloaded copies, read like local checkpoints
        setattr(config.checkpoint, field, local)


class BucketUploads:
    """Rank 0's uploads of committed checkpoints to the bucket, one at a time on a thread.

    Training never waits for an upload: a checkpoint committed while another uploads is queued,
    and a newer one replaces it there (uploading a superseded checkpoint only costs bandwidth; one
    line says it was skipped). So uploads go in the order of their steps and the bucket's
    ``latest`` only moves forward. The staging copies being uploaded or queued are
    :meth:`pinned`: pruning the staging directory leaves them."""

    def __init__(self, url: str, keep_last: int, faults: FaultPlan = NO_FAULTS):
        self.remote = RemoteCheckpoints(url, WHAT)
        self.keep_last, self.faults = keep_last, faults
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._uploading: Optional[Path] = None
        self._queued: Optional[tuple[Path, int]] = None
        self.uploaded: Optional[str] = None
        """The newest iteration this run uploaded."""
        self.failure: Optional[str] = None
        """The line that said the newest upload failed (None once one succeeds)."""

    def submit(self, iteration: Path, step: int) -> None:
        """Upload ``iteration`` in the background; returns at once. With an upload in flight, it
        waits in the queue, in place of any older one queued there (skipped)."""
        with self._lock:
            if self._uploading is not None:
                skipped, self._queued = self._queued, (iteration, step)
                if skipped is not None:
                    _say(f"skipped upload of {skipped[0].name}: {iteration.name} is newer")
                return
            self._uploading = iteration
        self._thread = threading.Thread(target=self._run, args=(iteration, step),
                                        name="megasmol-upload", daemon=True)
        self._thread.start()

    def pinned(self) -> set[Path]:
        """The staging copies being uploaded or queued (not to be pruned)."""
        with self._lock:
            return {p for p in (self._uploading, self._queued and self._queued[0]) if p is not None}

    def _run(self, iteration: Path, step: int) -> None:
        """The upload thread: ``iteration``, then whatever was queued meanwhile, until none is."""
        job: Optional[tuple[Path, int]] = (iteration, step)
        try:
            while job is not None:
                self._upload(*job)
                with self._lock:
                    job, self._queued = self._queued, None
                    self._uploading = job[0] if job is not None else None
        finally:
            if job is not None:  # not an Exception (``_upload`` takes those): nothing uploads now
                with self._lock:
                    self._uploading = self._queued = None
                self.failure = f"uploading {job[0].name} to {self.remote} was stopped"

    def _upload(self, iteration: Path, step: int) -> None:
        started, store = time.perf_counter(), self.remote.store
        files = iter(range(1 << 30))
        try:
            self.remote.upload(iteration, on_file=lambda _: self.faults.before_upload(step, next(files)))
            pruned = self.remote.prune(self.keep_last)
        except (UploadFailed, *store._errors()) as exc:
            cause = str(exc) if isinstance(exc, UploadFailed) else store.describe(exc)
            self.failure = (f"uploading {iteration.name} to {self.remote} failed: {cause}; the "
                            f"bucket's latest stays {self.uploaded or self._bucket_latest()}")
            _say(self.failure)
            return
        except Exception as exc:  # a bug, not the bucket: keep its traceback, and fail the run's close
            self.failure = (f"uploading {iteration.name} to {self.remote} stopped on an unexpected "
                            f"{type(exc).__name__}: {exc}; the bucket's latest stays "
                            f"{self.uploaded or self._bucket_latest()}")
            traceback.print_exc()
            _say(self.failure)
            return
        self.uploaded, self.failure = iteration.name, None
        gone = f", removed {', '.join(pruned)}" if pruned else ""
        _say(f"uploaded {iteration.name} to {self.remote} ({time.perf_counter() - started:.1f}s{gone})")

    def _bucket_latest(self) -> str:
        try:
            return self.remote.latest() or "none"
        except Exception:  # the bucket is what failed: say what is known
            return "as it was"

    def wait(self) -> None:
        """Wait for the upload in flight and the one queued after it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Wait for the uploads in flight and queued; raise when the newest checkpoint is not in
        the bucket."""
        self.wait()
        if self.failure is not None:
            raise UploadFailed(f"{self.failure} (the local copy is complete: run again to upload it)")
