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
from tests.conftest import run_cli
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
    """An uninterrupted local DP=2 run (distributed optimizer) from a saved initial checkpoint."""
    root = tmp_path_factory.mktemp("reference")
    config = write_training_run(root, steps=STEPS, checkpoint={"keep_last": 0}, eval={"interval": 0})
    run_cli("init", "--spec", str(root / "spec.yaml"), "--out", str(root / "init"), "--seed", "3")
    torchrun_train(config, f"checkpoint.init_from={root / 'init'}", "optim.distributed=true")
    return {"root": root, "losses": step_losses(root / "run")}


def test_dp2_saves_to_the_bucket_and_resumes_from_it_bit_for_bit(reference, s3, tmp_path):
    config = write_training_run(tmp_path, steps=STEPS, eval={"interval": 0},
                                checkpoint={"dir": s3.url("runs/a"), "keep_last": 1, "async_save": True})
    sets = (f"checkpoint.init_from={reference['root'] / 'init'}", "optim.distributed=true")
    first = torchrun_train(config, *sets, "training.stop_after_step=5")
    assert "uploaded iter_0000005 to " + s3.url("runs/a") in first.stdout + first.stderr
    assert s3.text("runs/a/latest") == "iter_0000005\n"
    manifest = json.loads(s3.text(f"runs/a/iter_0000005/{MANIFEST}"))
    stored = s3.keys("runs/a/iter_0000005/")
    assert {f"runs/a/iter_0000005/{name}" for name in manifest["files"]} | {
        f"runs/a/iter_0000005/{MANIFEST}"} == set(stored)
    assert {"megasmol.json", "metadata.json", ".metadata", "common.pt"} <= set(manifest["files"])
    assert any(name.endswith(".distcp") for name in manifest["files"])

    # A new machine: nothing local but the run's logs; the checkpoint comes from the bucket.
    shutil.rmtree(tmp_path / "run" / "checkpoints")
    second = torchrun_train(config, *sets)
    out = second.stdout + second.stderr
    assert "downloaded iter_0000005 from " + s3.url("runs/a") in out and "resumed from" in out
    assert step_losses(tmp_path / "run") == reference["losses"]  # every step, bit for bit
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
    run_cli("export-hf", "--checkpoint", s3.url("run"), "--out", str(out))
    assert (out / "config.json").is_file() and any(out.glob("*.safetensors"))


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


def test_a_prefix_with_another_runs_checkpoints_is_refused(reference, s3, tmp_path):
    first = write_training_run(tmp_path / "a", steps=5, eval={"interval": 0},
                               checkpoint={"dir": s3.url("shared")})
    train(first, f"checkpoint.init_from={reference['root'] / 'init'}")
    assert s3.text("shared/latest") == "iter_0000005\n"
    second = write_training_run(tmp_path / "b", steps=5, eval={"interval": 0},
                                checkpoint={"dir": s3.url("shared")})
    second.write_text(second.read_text().replace("recipe.yaml", "../b/other.yaml"))
    (tmp_path / "b" / "other.yaml").write_text((tmp_path / "b" / "recipe.yaml").read_text())
    _fails_before_step_1(second, tmp_path / "b", {}, "holds another run's checkpoints (iter_0000005: "
                         "data.recipe")
