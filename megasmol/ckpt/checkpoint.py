"""Checkpoints: Megatron-Core ``dist_checkpointing`` directories, written atomically.

Layout of a checkpoint root::

    ROOT/latest                 name of the newest complete iteration directory
    ROOT/iter_0000100/          dist_checkpointing files (loadable under any TP/PP layout)
    ROOT/iter_0000100/megasmol.json   model spec, step, layout, format version
    ROOT/iter_0000100/tokenizer/      tokenizer files, when known

An iteration is first written as ``iter_XXXXXXX.partial`` and renamed once every rank has
finished; ``latest`` is replaced (write-then-rename) only after that.  A crash mid-save leaves
a ``.partial`` directory that nothing loads and the previous ``latest`` untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional, Union

import torch

from megasmol.ckpt import locate
from megasmol.errors import OutputExists, UserError
from megasmol.runtime.threads import one_intra_op_thread
from megasmol.utils.faults import NO_FAULTS, FaultPlan
from megasmol.utils.fs import atomic_write_text, fsync_directory

FORMAT_VERSION = 1
META_FILE, LATEST_FILE = locate.META_FILE, locate.LATEST_FILE  # one spelling, torch-free
TOKENIZER_DIR = "tokenizer"


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, incomplete or does not fit the model."""


def _checkpoint_exception():
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


def load_errors() -> tuple[type[BaseException], ...]:
    """What a failed load raises: ordinary exceptions, and PyTorch DCP's ``CheckpointException``
    (a ``BaseException``, which ``except Exception`` would miss)."""
    return (Exception, _checkpoint_exception())


_ZIP_DAMAGE = "PytorchStreamReader failed reading zip archive"


def describe_error(exc: BaseException) -> str:
    """One line for a failed load or save: the first rank's underlying error, not DCP's traces."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, (inner, _) = sorted(failures.items())[0]
        return f"{describe_error(inner)} (rank {rank})"
    if isinstance(exc, EOFError):
        return "a file ends early (truncated?)"
    if _ZIP_DAMAGE in str(exc):  # torch.load of a cut (or overwritten) zip-format torch file
        return "a file ends early or is damaged (truncated?)"
    text = str(exc).strip().splitlines()
    name = type(exc).__name__
    return f"{name}: {text[0]}" if text else name


def describe_load_error(iteration: Path, exc: BaseException) -> str:
    """:func:`describe_error`, naming the file when one is shorter than the checkpoint's
    ``.metadata`` says (a truncated copy), with what to do about it."""
    from megasmol.ckpt.storage import short_file

    short = short_file(iteration)
    if short is None:
        return describe_error(exc)
    return (f"{short} ends early (truncated?): copy the checkpoint again from a complete one "
            "(a damaged file cannot be repaired in place)")


# What a full disk looks like from inside torch's writers: errno 28 only sometimes; the zip
# writer's own check ("unexpected pos") or a short write otherwise.
_FULL_DISK_SIGNS = ("No space left on device", "[Errno 28]", "unexpected pos", "file write failed")
_NEARLY_FULL_BYTES = 64 * 2**20


def disk_full(root: Path, cause: str) -> Optional[str]:
    """``No space left on device (ENOSPC) in ROOT: N MB free`` when the save failed for want of
    space (the error's text says so, or the directory's filesystem has under 64 MB left)."""
    probe = next((p for p in (root, *root.parents) if p.exists()), None)
    free = shutil.disk_usage(probe).free if probe is not None else None
    if any(sign in cause for sign in _FULL_DISK_SIGNS) or (free is not None and free < _NEARLY_FULL_BYTES):
        left = "" if free is None else f": {free / 2**20:.1f} MB free"
        return f"no space left on device (ENOSPC) in {root}{left}"
    return None


def iteration_dirname(step: int) -> str:
    return f"iter_{step:07d}"


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def resolve(path: str | Path) -> Path:
    """An iteration directory from a checkpoint root (via ``latest``), itself, or a run directory
    (the checkpoint root it keeps: ``ckpt/locate.py``)."""
    from megasmol.ckpt import trust

    trust.install()  # every read of a checkpoint goes through here
    given = path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a file, not a checkpoint directory")
    path = locate.checkpoint_root(path)
    if (path / META_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        name = latest.read_text().strip()
        if not name:
            raise CheckpointError(f"{latest} is empty (truncated?): it should name an iteration "
                                  f"directory; {_how_to_repair(latest)}")
        target = path / name
        if not (target / META_FILE).is_file():
            raise CheckpointError(f"{latest} points at {name!r}, which is not a complete iteration "
                                  f"directory (truncated?); {_how_to_repair(latest)}")
        return target
    if given.name.endswith(".partial"):
        raise CheckpointError(f"{given}: an interrupted save (.partial), not a checkpoint")
    raise CheckpointError(locate.not_a_checkpoint(given))


def _how_to_repair(latest: Path) -> str:
    """What to do about a damaged ``latest``: the complete iterations beside it, newest first, and
    how to start from one; or, with none, how to start without."""
    complete = sorted((p for p in latest.parent.glob("iter_???????") if is_complete(p)),
                      key=lambda p: _step_of(p.name), reverse=True)
    if not complete:
        return (f"no complete iter_* directory is beside it: delete {latest} to train from the "
                "start, or use another checkpoint")
    names = ", ".join(p.name for p in complete[:3]) + (", ..." if len(complete) > 3 else "")
    newest = complete[0]
    return (f"complete ones here, newest first: {names}. To start from {newest.name}, run "
            f"`echo {newest.name} > {shlex.quote(str(latest))}` and run the command again, or give "
            f"{newest} itself where a command takes a checkpoint")


def read_metadata(path: str | Path) -> dict:
    iteration = resolve(path)
    meta_path = iteration / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: corrupt ({exc})") from None
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: unsupported format {meta.get('format')!r}")
    for required in ("metadata.json", ".metadata", "common.pt"):
        if not (iteration / required).is_file():
            raise CheckpointError(f"{iteration}: dist_checkpointing file {required} is missing "
                                  "(an incomplete copy?)")
    return meta


def latest_iteration(root: str | Path) -> Optional[Path]:
    """The complete iteration ``root/latest`` names, or None when there is none yet."""
    latest = Path(root) / LATEST_FILE
    if not latest.is_file():
        return None
    return resolve(root)


def tokenizer_dir(path: str | Path) -> Optional[Path]:
    iteration = resolve(path)
    candidate = iteration / TOKENIZER_DIR
    return candidate if candidate.is_dir() else None


def save_checkpoint(
    model,
    root: str | Path,
    step: int,
    metadata: dict,
    *,
    extra_sharded_state: Union[None, dict, Callable[[dict], dict]] = None,
    tokenizer_source: Optional[str | Path] = None,
    async_queue=None,
    on_commit: Optional[Callable[[Path], None]] = None,
    faults: FaultPlan = NO_FAULTS,
    name: Optional[str] = None,
) -> Path:
    """Collective: every rank calls it with its own model chunk.

    ``extra_sharded_state`` is added to the model's sharded state dict; a callable gets the
    model's dict (an optimizer needs it to name its states) and returns the extra entries.
    With ``async_queue`` (Megatron-Core's ``AsyncCallsQueue``) the files are written in the
    background and the commit (rename, ``latest``, then ``on_commit`` on rank 0) runs when the
    queue finalizes the request; without it, everything happens before this returns. ``faults``
    is the tests' ``utils.faults.FaultPlan`` (its save seams). ``name``: the directory's name
    instead of ``iter_STEP`` (an averaged checkpoint says what it is); ``latest`` names it all the
    same, so every command that takes the root finds it.
    """
    from megatron.core import dist_checkpointing

    from megasmol.ckpt.trust import msc_off
    from megasmol.runtime.children import own_megatron_write_queue

    msc_off()
    own_megatron_write_queue()  # its helper process ends with this rank, however it ends
    root = Path(root)
    final = root / (name or iteration_dirname(step))
    partial = root / (final.name + ".partial")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    _barrier()
    sharded = model.sharded_state_dict()
    if callable(extra_sharded_state):
        extra_sharded_state = extra_sharded_state(sharded)
    if extra_sharded_state:
        sharded.update(extra_sharded_state)

    def commit() -> None:
        _barrier()  # every rank's files (and Megatron's metadata) are written
        faults.before_commit(step)
        if _rank() == 0:
            if tokenizer_source is not None:
                copy_tokenizer(tokenizer_source, partial / TOKENIZER_DIR)
            meta = {"format": FORMAT_VERSION, "step": step, **metadata}
            atomic_write_text(partial / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            replace_directory(partial, final)
            atomic_write_text(root / LATEST_FILE, final.name + "\n")
            if on_commit is not None:
                on_commit(final)
        _barrier()

    faults.before_write(step)
    if async_queue is None:
        dist_checkpointing.save(sharded, str(partial))
        commit()
        return final
    request = dist_checkpointing.save(sharded, str(partial), async_sharded_save=True)
    faults.async_request(step, request)
    request.add_finalize_fn(commit)
    async_queue.schedule_async_request(request)
    return final


def enclosing_iteration(path: str | Path) -> Optional[Path]:
    """The checkpoint iteration directory that ``path`` is or lies in, or None."""
    path = Path(path).resolve()
    return next((p for p in (path, *path.parents) if (p / META_FILE).is_file()), None)


def check_output_dir(out: str | Path, *, sources: tuple = (), what: str = "--out") -> Path:
    """Refuse an output directory that would damage an existing run: one that holds a training
    run's checkpoints (its ``latest`` would move to a weights-only checkpoint, and the run could
    no longer resume), one inside a checkpoint's iteration directory, or one that is or contains
    a ``source`` the command reads from."""
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{what} {out} is a file, not a directory")
    inside = enclosing_iteration(out)
    if inside is not None:
        raise OutputExists(f"{what} {out} is inside checkpoint {inside}: what is written there "
                              "would become part of that checkpoint; choose a directory outside it")
    holds_run = False
    if (out / LATEST_FILE).is_file():
        with contextlib.suppress(CheckpointError, OSError, ValueError):
            holds_run = "train_state" in read_metadata(out)
    if holds_run:
        raise OutputExists(
            f"{what} {out} holds a training run's checkpoints; writing there would move its "
            "latest to a weights-only checkpoint: choose a new directory")
    for source in sources:
        source = Path(source).resolve()
        if source == out or out in source.parents:
            raise OutputExists(f"{what} {out} contains {source}, which this command reads: "
                                  "choose a directory outside it")
    return out


def replace_directory(new: Path, final: Path) -> None:
    """Move complete directory ``new`` to ``final``; an existing ``final`` is renamed aside first
    and deleted only once ``new`` is in place, so some complete copy exists at every moment."""
    aside = None
    if final.exists():
        aside = final.with_name(f"{final.name}.replaced-{os.getpid()}")
        os.replace(final, aside)
    os.replace(new, final)
    fsync_directory(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def is_complete(iteration: Path) -> bool:
    """Every rank's files and megasmol.json (written last, after all ranks finished) exist."""
    return (iteration / META_FILE).is_file() and (iteration / "metadata.json").is_file()


def _step_of(name: str) -> int:
    return int(name.split(".")[0].removeprefix("iter_"))


def recover_interrupted_saves(root: str | Path) -> list[str]:
    """Tidy what a crash during a save left behind in ``root``; returns what was done.

    * ``iter_N.partial`` without ``megasmol.json``: some rank had not finished; deleted.
    * ``iter_N.partial`` with it: every rank had finished and only the rename was missed; it is
      renamed into place (never deleted: it may be the only complete copy of step N).
    * ``iter_N.replaced-PID``: the previous copy of step N, renamed aside during a replacement;
      deleted when ``iter_N`` is complete, else renamed back.
    * ``latest`` then names the newest complete iteration when it named a missing one.
    """
    root = Path(root)
    done = []
    for partial in sorted(root.glob("iter_*.partial")):
        final = root / partial.name.removesuffix(".partial")
        if is_complete(partial) and not is_complete(final):
            replace_directory(partial, final)
            done.append(f"completed the interrupted save {final.name}")
        else:
            shutil.rmtree(partial, ignore_errors=True)
            done.append(f"removed the interrupted save {partial.name}")
    for aside in sorted(root.glob("iter_*.replaced-*")):
        final = root / aside.name.split(".")[0]
        if is_complete(final) or not is_complete(aside):
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
            done.append(f"restored {final.name}")
    latest = root / LATEST_FILE
    named = latest.read_text().strip() if latest.is_file() else ""
    if named and not is_complete(root / named):
        complete = sorted((p for p in root.glob("iter_???????") if is_complete(p)),
                          key=lambda p: _step_of(p.name))
        if complete:
            atomic_write_text(latest, complete[-1].name + "\n")
            done.append(f"latest named the incomplete {named}; now {complete[-1].name}")
    return done


TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)


def copy_tokenizer(source: str | Path, dest: Path) -> bool:
    """Copy the tokenizer files found in ``source`` (a directory); returns whether any were."""
    source = Path(source)
    found = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not found:
        return False
    dest.mkdir(parents=True, exist_ok=True)
    for file in found:
        shutil.copy2(file, dest / file.name)
    return True


def load_model_weights(model, path: str | Path, strict: bool = True) -> dict:
    """Load weights into this rank's model chunk from any layout; returns the metadata."""
    from megatron.core import dist_checkpointing

    meta = read_metadata(path)
    iteration = resolve(path)
    sharded = model.sharded_state_dict()
    try:
        # The load all-gathers metadata on gloo's worker threads: with torch's threads, one of
        # them would keep an OpenMP team and slow every later CPU forward pass (runtime/threads.py).
        with one_intra_op_thread():
            state = dist_checkpointing.load(sharded, str(iteration))
    except load_errors() as exc:  # Megatron and DCP raise several types
        raise CheckpointError(f"{iteration}: cannot load model weights: "
                              f"{describe_load_error(iteration, exc)}") from None
    # A training checkpoint's common state (optimizer groups, ...) comes back too; keep the model's.
    model.load_state_dict({k: v for k, v in state.items() if k in sharded}, strict=strict)
    return meta
