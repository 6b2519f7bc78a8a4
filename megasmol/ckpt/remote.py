"""Checkpoints in a bucket: the layout of a checkpoint root (``ckpt/checkpoint.py``) as objects.

::

    s3://bucket/prefix/latest                     name of the newest complete iteration
    s3://bucket/prefix/iter_0000100/...           the iteration directory's files, one object each
    s3://bucket/prefix/iter_0000100/megasmol-manifest.json   written after all of them

A checkpoint is written to a local staging directory first (at disk speed, and the same code
as a local run), then uploaded; the manifest (every file's size and sha256) is written once every
object is uploaded and its size read back, and ``latest`` only after that: an interrupted upload
leaves an iteration without a manifest, which nothing reads, and the previous ``latest``.

:func:`fetch` is how every reader (``init_from``, ``export-hf``, ``eval``, ``average``,
``generate``, ``chat``) takes an ``s3://`` checkpoint: it downloads the iteration once into a
local cache and returns that directory.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Optional

from megasmol.ckpt.object_store import MANIFEST, ObjectStore, UploadFailed
from megasmol.utils.fs import shown
from megasmol.utils.s3_url import S3Url, StoreError, parse

LATEST = "latest"
ITERATION = re.compile(r"^iter_\d{7}$")
CACHE_ENV = "MEGASMOL_S3_CACHE"
"""Where :func:`fetch` keeps downloaded checkpoints (default ``~/.cache/megasmol/s3``)."""


def _step(name: str) -> int:
    return int(name.removeprefix("iter_"))


class RemoteCheckpoints:
    """The checkpoint root ``url`` in a bucket (``what``: the field or option it came from)."""

    def __init__(self, url: S3Url | str, what: str = "checkpoint.dir", client=None):
        self.url = parse(url, what) if isinstance(url, str) else url
        self.what = what
        try:
            self.store = ObjectStore(self.url, client)
        except StoreError as exc:  # no boto3, or an AWS_PROFILE that does not exist
            raise StoreError(f"{what}: {self.url}: {exc}") from None

    def __str__(self) -> str:
        return str(self.url)

    def latest(self) -> Optional[str]:
        """The iteration ``latest`` names, when it is complete (has its manifest)."""
        name = (self.store.read_text(LATEST) or "").strip()
        return name if name and self.store.manifest(name) is not None else None

    def iterations(self) -> list[str]:
        """The iterations under the root (complete or not), oldest first."""
        return sorted((n for n in self.store.children() if ITERATION.match(n)), key=_step)

    def complete(self) -> list[str]:
        return [n for n in self.iterations() if self.store.manifest(n) is not None]

    def upload(self, iteration: Path, on_file=None) -> None:
        """Upload iteration directory ``iteration``, then point ``latest`` at it."""
        self.store.upload_dir(iteration, iteration.name, on_file=on_file)
        self.store.write_text(LATEST, iteration.name + "\n")

    def prune(self, keep_last: int) -> list[str]:
        """Delete all but the newest ``keep_last`` complete iterations (0: keep all), and every
        incomplete one older than ``latest`` (an interrupted upload); returns the names deleted."""
        latest = self.latest()
        if latest is None:
            return []
        complete = self.complete()
        keep = set(complete[-keep_last:]) if keep_last else set(complete)
        keep.add(latest)
        gone = [n for n in self.iterations()
                if n not in keep and (n in complete or _step(n) < _step(latest))]
        for name in gone:
            self.store.delete(name)
        return gone

    def download(self, name: str, root: Path) -> Path:
        """Download iteration ``name`` into ``root/name`` (via ``name.download``, renamed once
        every file is checked); returns the directory."""
        root.mkdir(parents=True, exist_ok=True)
        staging = root / f"{name}.download"
        shutil.rmtree(staging, ignore_errors=True)
        self.store.download_dir(name, staging)
        (staging / MANIFEST).unlink(missing_ok=True)
        final = root / name
        if final.exists():  # an older or partial copy: set aside, removed once the new one is in
            aside = root / f"{name}.replaced-{os.getpid()}"
            os.replace(final, aside)
            os.replace(staging, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(staging, final)
        return final


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "megasmol" / "s3").expanduser()


def fetch(value: str, what: str = "--checkpoint") -> Path:
    """A local copy of the checkpoint at ``value`` (an ``s3://`` checkpoint root, whose ``latest``
    is taken, or an iteration), downloaded into the cache unless it is there already (complete:
    the cache's copy is only renamed into place once every file is checked). Read-only on the
    bucket. Raises StoreError naming ``what`` (without importing torch: the CLI calls it while
    it checks its arguments)."""
    url = parse(value, what)
    remote = RemoteCheckpoints(url, what)
    try:
        remote.store.check_access(what, write=False)
        if remote.store.manifest("") is not None:  # the URL is an iteration itself
            root, name = RemoteCheckpoints(url.parent(), what, remote.store.client), url.name
        else:
            root, name = remote, remote.latest()
            if name is None:
                done = remote.complete()
                hint = f"; complete ones: {', '.join(done[-3:])}" if done else ""
                raise StoreError(f"{what}: {url}: no complete checkpoint (no {LATEST} naming "
                                      f"an iteration with its {MANIFEST}){hint}")
        local_root = cache_root() / url.bucket / root.url.prefix
        local = local_root / name
        if not (local / "megasmol.json").is_file():
            print(f"downloading {root.url.child(name)} to {shown(local)}", flush=True)
            root.download(name, local_root)
        return local
    except UploadFailed as exc:
        raise StoreError(f"{what}: {exc}") from None
    except remote.store._errors() as exc:
        raise StoreError(f"{what}: {url}: {remote.store.describe(exc)}") from None


def local_checkpoint(value: str | Path, what: str = "--checkpoint") -> Path:
    """``value`` itself when it is a local path, else :func:`fetch`'s local copy."""
    from megasmol.utils.s3_url import is_url

    return fetch(str(value), what) if is_url(str(value)) else Path(value)


__all__ = ["RemoteCheckpoints", "fetch", "local_checkpoint", "cache_root", "StoreError"]
