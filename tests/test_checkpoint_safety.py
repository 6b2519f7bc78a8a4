"""What a checkpoint may do to the process that reads it, and what commands may do to a run.

Crafted files must not run code; a crash during a save must never cost the only complete copy;
commands refuse outputs that would damage a run; damaged files give one line naming them.
"""

import io
import json
import os
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

from megasmol.ckpt import trust
from megasmol.ckpt.checkpoint import (
    CheckpointError,
    check_output_dir,
    latest_iteration,
    read_metadata,
    recover_interrupted_saves,
)
from megasmol.ckpt.reader import CheckpointReader
from megasmol.ckpt.train_state import capture_rng, prune_checkpoints, restore_rng
from megasmol.convert.export import export_hf
from megasmol.model.init import init_checkpoint
from tests.conftest import cli_in_process, run_cli
from tests.specs import tiny_smollm3


class _Payload:
    """Unpickling this runs ``os.system`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt") / "model"
    init_checkpoint(tiny_smollm3(), root)
    return root


def _copy(checkpoint, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(checkpoint, dest)
    return dest


def test_crafted_dcp_metadata_is_refused_before_it_runs(checkpoint, tmp_path, llama_tokenizer_dir):
    ckpt = _copy(checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    (ckpt / "iter_0000000" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refuses to load posix.system"):
        CheckpointReader(ckpt)
    for command in (["export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")],
                    ["generate", "--checkpoint", str(ckpt), "--prompt", "hi",
                     "--tokenizer", str(llama_tokenizer_dir)]):
        proc = cli_in_process(*command)
        assert proc.returncode == 2, proc.stderr
        assert "refuses to load" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


def test_a_crafted_common_pt_is_refused_by_name(checkpoint, tmp_path):
    """Megatron-Core reads common.pt with torch's safe loader, whose refusal suggests
    ``weights_only=False``; megasmol names the file and says it never does that."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    trust.install()
    ckpt = _copy(checkpoint, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(marker)}, ckpt / "iter_0000000" / "common.pt")
    with pytest.raises(trust.UntrustedCheckpoint, match=r"iter_0000000/common.pt: refused") as info:
        TorchCommonLoadStrategy().load_common(ckpt / "iter_0000000")
    assert "never loads checkpoint files with weights_only=False" in str(info.value)
    assert not marker.exists()
    assert TorchCommonLoadStrategy().load_common(checkpoint / "iter_0000000") == {}  # a genuine one loads


def test_metadata_that_names_files_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    ckpt = _copy(checkpoint, tmp_path)
    index = ckpt / "iter_0000000" / ".metadata"
    with open(index, "rb") as handle:
        metadata = trust.load_metadata(handle)
    (tmp_path / "outside.distcp").write_bytes(b"\0" * 64)
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    index.write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError, match=r"names the file '../../outside.distcp'.*not a file of"):
        CheckpointReader(ckpt)


def test_genuine_metadata_still_loads(checkpoint):
    reader = CheckpointReader(checkpoint)  # through the restricted unpickler
    assert reader.shape("embedding.word_embeddings.weight")[0] == tiny_smollm3().vocab_size


def test_byte_items_load_as_data_only(tmp_path):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    trust.install()
    planner = DefaultLoadPlanner(flatten_state_dict=False)
    planner.state_dict = {}
    item = ReadItem(LoadItemType.BYTE_IO, MetadataIndex("rng"), torch.Size([0]),
                    MetadataIndex("rng"), torch.Size([0]), torch.Size([0]))
    marker = tmp_path / "pwned"
    crafted = io.BytesIO()
    torch.save({"state": _Payload(marker)}, crafted)
    crafted.seek(0)
    with pytest.raises(trust.UntrustedCheckpoint, match="'rng' is not plain data"):
        planner.load_bytes(item, crafted)
    assert not marker.exists()
    # megasmol's own RNG state is plain data: it round-trips through the restricted load.
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    saved = io.BytesIO()
    torch.save(capture_rng(), saved)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    saved.seek(0)
    planner.load_bytes(item, saved)
    restore_rng(planner.state_dict["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_interrupted_replacement_keeps_a_complete_copy(checkpoint, tmp_path):
    root = _copy(checkpoint, tmp_path)
    done = root / "iter_0000000"
    # A kill after the old copy was renamed aside and before the new one was renamed in.
    shutil.copytree(done, root / "iter_0000000.partial")
    done.rename(root / "iter_0000000.replaced-123")
    with pytest.raises(CheckpointError, match="not a complete iteration"):
        latest_iteration(root)
    actions = recover_interrupted_saves(root)
    assert actions == ["completed the interrupted save iter_0000000"]
    assert latest_iteration(root) == done and not list(root.glob("*.replaced-*"))
    # Only the aside copy survived: it is renamed back.
    done.rename(root / "iter_0000000.replaced-7")
    assert recover_interrupted_saves(root) == ["restored iter_0000000"]
    assert latest_iteration(root) == done
    # A partial without megasmol.json (some rank had not finished) is removed.
    shutil.copytree(done, root / "iter_0000001.partial")
    (root / "iter_0000001.partial" / "megasmol.json").unlink()
    assert recover_interrupted_saves(root) == ["removed the interrupted save iter_0000001.partial"]
    # latest naming a missing directory moves to the newest complete one.
    (root / "latest").write_text("iter_0000009\n")
    assert "now iter_0000000" in recover_interrupted_saves(root)[-1]
    assert latest_iteration(root) == done


def _fake_checkpoint(root, step, finite):
    path = root / f"iter_{step:07d}"
    path.mkdir(parents=True)
    for name in ("metadata.json", ".metadata", "common.pt"):
        (path / name).write_text("{}")
    (path / "megasmol.json").write_text(json.dumps(
        {"format": 1, "step": step, "train_state": {"step": step, "weights_finite": finite}}))
    (root / "latest").write_text(path.name + "\n")


def test_pruning_never_deletes_the_last_finite_checkpoint(tmp_path):
    for step, finite in ((10, True), (20, True), (30, False), (40, False)):
        _fake_checkpoint(tmp_path, step, finite)
    doomed = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in doomed] == ["iter_0000010"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == [
        "iter_0000020", "iter_0000030", "iter_0000040"]
    _fake_checkpoint(tmp_path, 50, True)
    prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000040", "iter_0000050"]


def test_outputs_that_would_damage_a_run_are_refused(checkpoint, tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoints", 10, True)
    with pytest.raises(FileExistsError, match="holds a training run's checkpoints"):
        check_output_dir(run / "checkpoints")
    with pytest.raises(FileExistsError, match="contains"):
        check_output_dir(checkpoint.parent, sources=(checkpoint / "iter_0000000",))
    ckpt = _copy(checkpoint, tmp_path)
    # CLI: init / import-hf onto a run's checkpoints, export over its own source, --out a file.
    proc = cli_in_process("init", "--spec", "smollm3-tiny", "--out", str(run / "checkpoints"))
    assert proc.returncode == 2 and "holds a training run's checkpoints" in proc.stderr, proc.stderr
    assert (run / "checkpoints" / "latest").read_text() == "iter_0000010\n"
    export_hf(ckpt, tmp_path / "hf", show_progress=False)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == modes["config.json"] == 0o666 & ~_umask(), modes
    proc = cli_in_process("import-hf", "--hf", str(tmp_path / "hf"), "--out", str(run / "checkpoints"))
    assert proc.returncode == 2 and "holds a training run's checkpoints" in proc.stderr
    proc = cli_in_process("export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path), "--overwrite")
    assert proc.returncode == 2 and "which this command reads" in proc.stderr
    assert read_metadata(ckpt)["step"] == 0
    (tmp_path / "afile").write_text("x")
    for args in (["--out", str(tmp_path / "afile")], ["--out", str(tmp_path / "x"), "--max-shard-gb", "0"]):
        proc = cli_in_process("export-hf", "--checkpoint", str(ckpt), *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_damaged_checkpoints_give_one_line(checkpoint, tmp_path):
    ckpt = _copy(checkpoint, tmp_path)
    iteration = ckpt / "iter_0000000"

    def one_line(match, run=cli_in_process):
        proc = run("export-hf", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf"), "--quiet")
        assert proc.returncode == 2 and match in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1

    shard = next(iteration.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # truncated: DCP's CheckpointException
    # A real process once (nothing else on its stderr either), then in this one.
    one_line("cannot read embedding.word_embeddings.weight: a file ends early",
             lambda *args: run_cli(*args, check=False))
    (iteration / "common.pt").unlink()
    one_line("common.pt is missing")
    (ckpt / "latest").write_text("")
    one_line("latest is empty")


def test_a_truncated_latest_says_how_to_start_from_a_complete_checkpoint(checkpoint, tmp_path):
    """A truncated ``latest`` was refused without saying what to do: the line names the complete
    iterations beside it and a command that points ``latest`` at the newest, which then loads."""
    import subprocess

    ckpt = tmp_path / "my run"
    shutil.copytree(checkpoint, ckpt)
    shutil.copytree(ckpt / "iter_0000000", ckpt / "iter_0000003")
    shutil.copytree(ckpt / "iter_0000000", ckpt / "iter_0000007.partial")  # not complete: not offered
    for damaged in ("", "iter_000"):
        (ckpt / "latest").write_text(damaged)
        with pytest.raises(CheckpointError) as info:
            read_metadata(ckpt)
        line = str(info.value)
        assert "\n" not in line and "newest first: iter_0000003, iter_0000000." in line, line
        repair = line.split("`")[1]
        assert repair.startswith("echo iter_0000003 > "), line
        subprocess.run(["/bin/sh", "-c", repair], check=True)
        assert latest_iteration(ckpt) == ckpt / "iter_0000003"
    for iteration in ("iter_0000000", "iter_0000003"):
        (ckpt / iteration / "megasmol.json").unlink()
    with pytest.raises(CheckpointError, match="no complete iter_. directory is beside it: delete "):
        read_metadata(ckpt)


def test_damaged_hf_inputs_give_one_line(checkpoint, tmp_path):
    export_hf(checkpoint, tmp_path / "hf", show_progress=False)
    weights = tmp_path / "hf" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = cli_in_process("import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "a"))
    assert proc.returncode == 2 and "model.safetensors" in proc.stderr and "Traceback" not in proc.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": "4"}))
    proc = cli_in_process("import-hf", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "b"))
    assert proc.returncode == 2 and "num_hidden_layers must be a positive integer" in proc.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
