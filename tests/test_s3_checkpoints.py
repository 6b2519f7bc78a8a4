"""Checkpoints in S3-compatible storage, end to end against a real S3 server on the loopback
interface (moto's server mode with IAM authentication: tests/s3_fixtures.py): ``megasmol train``
with ``checkpoint.dir: s3://...`` under DP=2 with the distributed optimizer, resumed from the
bucket bit for bit; an upload killed halfway; pruning in the bucket; the readers (export-hf) from
the bucket; and the bad inputs that must fail before step 1."""

import json
import shutil
import signal
import time

import pytest

from megasmol.ckpt.object_store import MANIFEST
from megasmol.ckpt.remote import RemoteCheckpoints
from tests.conftest import cli_in_process
from tests.train_fixtures import (
    kill_session,
    start_train,
    step_losses,
    torchrun_train,
    train,
    write_training_run,
)

STEPS = 10


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A saved initial checkpoint the runs start from."""
    root = tmp_path_factory.mktemp("reference")
    write_training_run(root)  # its spec
    assert cli_in_process("init", "--spec", str(root / "spec.yaml"), "--out", str(root / "init"),
                          "--seed", "3").returncode == 0
    return {"root": root}


def test_dp2_saves_to_the_bucket_and_resumes_from_it_bit_for_bit(reference, s3, tmp_path):
    """DP=2 with the distributed optimizer, uploading every checkpoint; then a new machine whose
    bucket's latest is step 5 (as if the job had died before step 10's upload) resumes from the
    bucket and trains steps 6-10 with the losses the first run logged, bit for bit."""
    config = write_training_run(tmp_path, steps=STEPS, eval={"interval": 0},
                                checkpoint={"dir": s3.url("runs/a"), "keep_last": 0, "async_save": True})
    sets = (f"checkpoint.init_from={reference['root'] / 'init'}", "optim.distributed=true")
    first = torchrun_train(config, *sets)
    assert "uploaded iter_0000005 to " + s3.url("runs/a") in first.stdout + first.stderr
    assert s3.text("runs/a/latest") == "iter_0000010\n"
    manifest = json.loads(s3.text(f"runs/a/iter_0000005/{MANIFEST}"))
    stored = s3.keys("runs/a/iter_0000005/")
    assert {f"runs/a/iter_0000005/{name}" for name in manifest["files"]} | {
        f"runs/a/iter_0000005/{MANIFEST}"} == set(stored)
    assert {"megasmol.json", "metadata.json", ".metadata", "common.pt"} <= set(manifest["files"])
    assert any(name.endswith(".distcp") for name in manifest["files"])
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, STEPS + 1))

    # A new machine: nothing local but the run's logs; the checkpoint comes from the bucket.
    client = s3.server.client()
    for key in s3.keys("runs/a/iter_0000010/"):
        client.delete_object(Bucket=s3.name, Key=key)
    client.put_object(Bucket=s3.name, Key="runs/a/latest", Body=b"iter_0000005\n")
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    second = torchrun_train(config, *sets, "checkpoint.keep_last=1")
    out = second.stdout + second.stderr
    assert "downloaded iter_0000005 from " + s3.url("runs/a") in out and "resumed from" in out
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    again = [(r["step"], r["loss"]) for r in records if r["kind"] == "train"][STEPS:]
    assert again == [(step, losses[step]) for step in range(6, STEPS + 1)]  # bit for bit
    assert s3.text("runs/a/latest") == "iter_0000010\n"
    iterations = {key.split("/")[2] for key in s3.keys("runs/a/") if key.count("/") > 2}
    assert iterations == {"iter_0000010"}  # keep_last: 1, pruned in the bucket


def test_upload_killed_halfway_keeps_the_previous_latest(reference, s3, tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, eval={"interval": 0},
                                checkpoint={"dir": s3.url("run"), "keep_last": 3})
    init = f"checkpoint.init_from={reference['root'] / 'init'}"
    crashed = start_train(config, init, env_extra={"MEGASMOL_FAULT": "kill_in_upload:10"})
    crashed.wait(timeout=300)
    assert crashed.returncode == -signal.SIGKILL
    kill_session(crashed)  # and any helper process it left
    assert s3.text("run/latest") == "iter_0000005\n"
    cut = s3.keys("run/iter_0000010/")
    assert cut and f"run/iter_0000010/{MANIFEST}" not in cut  # some objects, never completed
    local = tmp_path / "run" / "checkpoints"
    assert (local / "latest").read_text() == "iter_0000010\n"  # the staging copy is complete

    again = train(config, init)
    assert ("checkpoints: the local iter_0000010 is newer than the bucket's latest (iter_0000005): "
            "uploading it") in again.stdout
    assert "nothing to train: the run is at step 10" in again.stdout
    assert s3.text("run/latest") == "iter_0000010\n"
    assert f"run/iter_0000010/{MANIFEST}" in s3.keys("run/iter_0000010/")

    # The readers take the bucket: export to Hugging Face straight from it.
    shutil.rmtree(local)
    out = tmp_path / "hf"
    assert cli_in_process("export-hf", "--checkpoint", s3.url("run"), "--out", str(out)).returncode == 0
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


def test_init_from_the_bucket_starts_as_the_local_copy_and_no_secret_is_written(reference, s3, s3_server,
                                                                              tmp_path):
    """``checkpoint.init_from: s3://...``: the initial checkpoint downloaded from the bucket gives
    the losses the same run gets from the local copy (bit for bit; the run's own seed would give
    others). And nothing secret in what megasmol prints or writes: the credentials appear in
    neither run's output, its run directory, nor the objects it uploaded."""
    RemoteCheckpoints(s3.url("init")).upload(reference["root"] / "init" / "iter_0000000")
    sections = {"eval": {"interval": 0}}
    remote = write_training_run(tmp_path / "a", steps=5, checkpoint={"dir": s3.url("a"), "keep_last": 0},
                                **sections)
    local = write_training_run(tmp_path / "b", steps=5, **sections)
    got = train(remote, f"checkpoint.init_from={s3.url('init')}")
    assert f"downloading {s3.url('init')}/iter_0000000 to " in got.stdout, got.stdout
    want = train(local, f"checkpoint.init_from={reference['root'] / 'init'}")
    losses = step_losses(tmp_path / "a" / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5] and losses == step_losses(tmp_path / "b" / "run")
    assert s3.text("a/latest") == "iter_0000005\n"

    secrets = list(s3_server.writer.values())
    written = [p.read_bytes() for p in (tmp_path / "a" / "run").rglob("*") if p.is_file()]
    uploaded = [s3.text(key) for key in s3.keys("a/") if key.endswith(".json")]
    for secret in secrets:
        assert secret not in got.stdout + got.stderr + want.stdout + want.stderr
        assert not any(secret.encode() in data for data in written)
        assert uploaded and not any(secret in text for text in uploaded)


def _fails_before_step_1(config, tmp_path, env, expect):
    started = time.monotonic()
    proc = train(config, check=False, env_extra=env)
    elapsed = time.monotonic() - started
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert err[-1].startswith("megasmol train: error: checkpoint.dir: s3://") and expect in err[-1], err[-1]
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not step_losses(tmp_path / "run")
    return elapsed


def test_bad_buckets_fail_before_step_1_in_one_line(s3, s3_server, tmp_path, monkeypatch):
    """Through the CLI once (one line, exit 2, no step trained), then each case through the check
    the trainer runs first (``train.bucket.prepare``), in this process."""
    from megasmol.config.run import load_run_config
    from megasmol.train.bucket import prepare
    from megasmol.utils.s3_url import StoreError

    config = write_training_run(tmp_path, steps=5, eval={"interval": 0},
                                checkpoint={"dir": s3.url("run")})
    _fails_before_step_1(config, tmp_path, {"AWS_SECRET_ACCESS_KEY": "wrong"}, "wrong credentials")

    def refused(env: dict, expect: str, url: str = s3.url("run")) -> float:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            started = time.monotonic()
            with pytest.raises(StoreError, match=f"checkpoint.dir: {url}.*{expect}"):
                prepare(load_run_config(config, [f"checkpoint.dir={url}"]))
            return time.monotonic() - started

    # Nothing listens on port 9: the connect is refused, retried 3 times, within seconds.
    assert refused({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"},
                   "cannot reach the endpoint http://127.0.0.1:9") < 10
    refused(s3_server.reader, "access denied")
    refused({}, "bucket no-such-bucket does not exist", "s3://no-such-bucket/run")


def test_a_refused_upload_is_one_line_and_the_bucket_keeps_the_last_complete_latest(s3, s3_server,
                                                                                   tmp_path):
    """The endpoint refuses the objects of the checkpoints at steps 4 and 6 (a policy denying
    those writes, checked by the server as a real one checks it; step 4's upload may also be
    skipped, superseded by step 6 while it waited): each refusal is one line saying
    the bucket's latest stays the last complete checkpoint; training goes on to its last step; the
    run then ends with exit 1 (its newest checkpoint is not in the bucket), its local copy complete."""
    denied = [f"arn:aws:s3:::{s3.name}/run/iter_000000{step}/*" for step in (4, 6)]
    keys = s3_server.user({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": denied}]})
    config = write_training_run(tmp_path, steps=6, eval={"interval": 0},
                                checkpoint={"dir": s3.url("run"), "interval": 2, "keep_last": 0})
    proc = train(config, check=False, env_extra=keys)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out, out
    said = [line for line in out.splitlines() if "failed" in line]
    # One line per refused upload, then the run's last line. Step 4's upload is refused unless it
    # was still queued behind step 2's when step 6 committed: then it is skipped, with its line.
    refused = [int(line.split(" iter_")[1][:7]) for line in said[:-1]]
    skipped = "checkpoints: skipped upload of iter_0000004: iter_0000006 is newer" in out.splitlines()
    assert refused == ([6] if skipped else [4, 6]), (said, skipped)
    for line, step in zip(said, refused):
        assert line.startswith(f"checkpoints: uploading iter_000000{step} to {s3.url('run')} failed: "
                               f"{s3.url('run')}/iter_000000{step}/"), line
        assert "was not written: access denied" in line and line.endswith(
            "; the bucket's latest stays iter_0000002"), line
    assert said[-1].startswith("megasmol train: error: uploading iter_0000006") and said[-1].endswith(
        "(the local copy is complete: run again to upload it)"), said[-1]
    assert max(step_losses(tmp_path / "run")) == 6  # training went on after the first refusal
    assert s3.text("run/latest") == "iter_0000002\n"
    assert f"run/iter_0000002/{MANIFEST}" in s3.keys("run/iter_0000002/")
    assert not any(key.endswith(MANIFEST) for key in s3.keys("run/iter_0000004/"))
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "iter_0000006\n"


def test_a_run_in_the_bucket_is_branched_from_and_its_prefix_refused_to_another_run(s3, tmp_path):
    """``checkpoint.branch_from: s3://bucket/prefix@STEP``: the source's model and optimizer
    state, downloaded from the bucket (a branch whose one step is skipped saves exactly them).
    And another run (another recipe) given the source's prefix as its checkpoint.dir is refused
    before step 1. (One source run for both.)"""
    import yaml

    from megasmol.ckpt.reader import CheckpointReader
    from megasmol.config.run import load_run_config
    from megasmol.train.bucket import prepare
    from megasmol.utils.s3_url import StoreError

    source = write_training_run(tmp_path, steps=5, eval={"interval": 0},
                                checkpoint={"dir": s3.url("src"), "keep_last": 0})
    train(source)
    assert s3.text("src/latest") == "iter_0000005\n"
    config = yaml.safe_load(source.read_text())
    config.pop("model")  # the branch's spec is its source's
    config["run_dir"] = "branch"
    config["training"]["train_steps"] = 1
    config["schedule"] = {"kind": "decay", "warmup_steps": 0, "min_lr": 0.0}
    config["checkpoint"] = {"branch_from": s3.url("src") + "@5", "keep_last": 0}
    config["spikes"] = {"skip_batches": [[1, 1]]}
    branch = tmp_path / "branch.yaml"
    branch.write_text(yaml.safe_dump(config))
    out = train(branch).stdout
    assert f"downloading {s3.url('src')}/iter_0000005 to " in out and "its step 5" in out, out
    src = CheckpointReader(tmp_path / "run" / "checkpoints" / "iter_0000005")  # the staging copy
    got = CheckpointReader(tmp_path / "branch" / "checkpoints")
    assert any(k.startswith("optimizer.state.exp_avg") for k in src.keys())
    assert set(got.keys()) == set(src.keys())
    for key in src.keys():
        assert src.read(key).equal(got.read(key)), key

    # A step the bucket does not hold: one line naming the field and the steps it has.
    with pytest.raises(StoreError, match=r"^checkpoint.branch_from: s3://.*/src has no complete "
                                         r"checkpoint at step 7 \(complete ones at steps \[5\]\)"):
        prepare(load_run_config(branch, [f"checkpoint.branch_from={s3.url('src')}@7"]))

    # Another run on the source's prefix: its recipe differs from the one the checkpoints record.
    other = write_training_run(tmp_path / "b", steps=5, eval={"interval": 0},
                               checkpoint={"dir": s3.url("src")})
    other.write_text(other.read_text().replace("recipe.yaml", "../b/other.yaml"))
    (tmp_path / "b" / "other.yaml").write_text((tmp_path / "b" / "recipe.yaml").read_text())
    _fails_before_step_1(other, tmp_path / "b", {}, "holds another run's checkpoints (iter_0000005: "
                         "data.recipe")
