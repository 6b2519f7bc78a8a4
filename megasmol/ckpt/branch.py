"""``checkpoint.branch_from`` resolved to a training checkpoint's iteration directory (the branch
point itself, its step and learning rate, is ``train/branch.py``'s). An ``s3://`` source
(``s3://bucket/prefix@STEP``, its latest without ``@STEP``, or an iteration) is first downloaded
into the local cache by :func:`fetch_source` (``train/bucket.py`` calls it before the model is
built) and read from there like a local one."""

from __future__ import annotations

from pathlib import Path

from megasmol.ckpt.checkpoint import iteration_dirname, resolve
from megasmol.ckpt.locate import checkpoint_root
from megasmol.config.typed import ConfigError

WHAT = "checkpoint.branch_from"


def fetch_source(text: str) -> str:
    """The local copy of the ``s3://`` source ``text`` (``ROOT@STEP``, a root or an iteration),
    downloaded into the cache unless it is there; raises StoreError naming the field."""
    from megasmol.ckpt.remote import RemoteCheckpoints, fetch
    from megasmol.utils.s3_url import StoreError, parse

    where, _, step = text.rpartition("@") if "@" in text else (text, "", "")
    if not step:
        return str(fetch(where, WHAT))
    if not step.isdigit():
        raise ConfigError(f"{WHAT}: {text!r}: the part after @ must be a step")
    root = RemoteCheckpoints(parse(where, WHAT), WHAT)
    name = iteration_dirname(int(step))
    try:
        complete = root.store.manifest(name) is not None
        have = [] if complete else [int(n.removeprefix("iter_")) for n in root.complete()]
    except root.store._errors() as exc:
        raise StoreError(f"{WHAT}: {where}: {root.store.describe(exc)}") from None
    if not complete:
        raise StoreError(f"{WHAT}: {where} has no complete checkpoint at step {step} (complete ones "
                         f"at steps {have or 'none'})")
    return str(fetch(str(root.url.child(name)), WHAT))


def locate_source(config) -> Path:
    """The iteration directory ``checkpoint.branch_from`` names, or an error naming the field."""
    text = config.checkpoint.branch_from
    where, _, step = text.rpartition("@") if "@" in text else (text, "", "")
    path = config.path(where)
    if not path.exists():
        raise ConfigError(f"checkpoint.branch_from: {path} does not exist")
    if step:
        if not step.isdigit():
            raise ConfigError(f"checkpoint.branch_from: {text!r}: the part after @ must be a step")
        root = checkpoint_root(path)  # a run directory keeps its checkpoints in a root of its own
        iteration = root / iteration_dirname(int(step))
        if not iteration.is_dir():
            have = sorted(int(p.name[5:]) for p in root.glob("iter_???????") if p.is_dir())
            raise ConfigError(f"checkpoint.branch_from: {root} has no checkpoint at step {step} "
                              f"(it has steps {have or 'none'})")
        return resolve(iteration)
    return resolve(path)  # a checkpoint root, an iteration or a run directory
