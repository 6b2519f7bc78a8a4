"""Experiment trackers with the real libraries in their offline / local modes: what the trainer
logged is read back with each library's own reader (W&B: its protobuf records of the offline run
file, as `wandb sync` reads them), and a restarted run continues the same tracker run."""

import json
import os
import struct
import subprocess
import sys
import time

import pytest

from megasmol.config.typed import ConfigError
from tests.conftest import REPO
from tests.train_fixtures import step_losses, train, write_training_run

pytest.importorskip("wandb")
pytest.importorskip("mlflow")
pytest.importorskip("trackio")


def _wandb_history(path) -> dict[int, dict]:
    """History rows of an offline ``run-<id>.wandb`` file: a LevelDB-style log (32 KiB blocks of
    checksum / length / type framed chunks) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    rows = {}
    for chunk in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            rows.setdefault(row["_step"], {}).update(row)
    return rows


def test_wandb_mlflow_and_trackio_receive_the_logged_metrics_and_resume(tmp_path):
    config = write_training_run(tmp_path, steps=6, eval={"interval": 3},
                                logging={"interval": 1, "trackers": ["wandb", "mlflow", "trackio"],
                                         "project": "ablations", "run_name": "tiny"})
    # No WANDB_SILENT here: keeping W&B's and trackio's banners off the console is megasmol's job.
    env = {"WANDB_MODE": "offline", "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1"}
    train(config, "training.stop_after_step=3", env_extra=env)
    first_ids = json.loads((tmp_path / "run" / "trackers.json").read_text())
    out = train(config, env_extra=env)  # a restart: the same tracker runs continue
    assert out.returncode == 0, out.stderr[-3000:]
    console = out.stdout + out.stderr
    assert "Trackio" not in console and "wandb:" not in console, console[-3000:]  # no banners
    assert json.loads((tmp_path / "run" / "trackers.json").read_text()) == first_ids
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]

    # W&B: both offline run files carry the same run id; their history has every step.
    files = sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*/run-{first_ids['wandb']}.wandb"))
    assert len(files) == 2
    history = {}
    for path in files:
        history.update(_wandb_history(path))
    assert {s: history[s]["train/loss"] for s in losses} == pytest.approx(losses, rel=1e-12)
    assert "validation/loss" in history[3]

    # MLflow: the local file store, read with MlflowClient.
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(tmp_path / "run" / "mlruns").resolve().as_uri())
    run = client.get_run(first_ids["mlflow"])
    assert run.data.params["training.train_steps"] == "6"
    metric = {m.step: m.value for m in client.get_metric_history(first_ids["mlflow"], "train/loss")}
    assert metric == pytest.approx(losses, rel=1e-12)
    assert client.get_experiment(run.info.experiment_id).name == "ablations"

    # trackio: its local SQLite store, read with trackio's own storage API.
    script = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
              "print(json.dumps(SQLiteStorage.get_logs('ablations', 'tiny')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}, cwd=REPO)
    logs = json.loads(proc.stdout.strip().splitlines()[-1])
    tracked = {row["step"]: row["train/loss"] for row in logs if "train/loss" in row}
    assert tracked == pytest.approx(losses, rel=1e-12)


def test_tracker_credentials_and_servers_are_checked_before_step_1(tmp_path, monkeypatch):
    from megasmol.train.tracker_checks import mlflow_problem, wandb_problem

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: never logged in
    assert "wandb has no API key" in wandb_problem({})
    assert wandb_problem({"WANDB_MODE": "offline"}) is None
    assert "cannot reach 127.0.0.1:9" in wandb_problem({"WANDB_API_KEY": "k",
                                                        "WANDB_BASE_URL": "http://127.0.0.1:9"})
    assert mlflow_problem(None, {}) is None and mlflow_problem("sqlite:///x.db", {}) is None
    # End to end: an unreachable MLflow server is one line before the model is built.
    config = write_training_run(tmp_path, steps=4, logging={"trackers": ["mlflow"],
                                                            "mlflow_tracking_uri": "http://127.0.0.1:9"})
    started = time.time()
    proc = train(config, check=False)
    assert proc.returncode == 2 and "cannot reach 127.0.0.1:9" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and time.time() - started < 120
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_selected_tracker_that_is_not_installed_is_named(tmp_path, monkeypatch):
    import builtins

    from megasmol.train import trackers

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("no wandb")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_wandb(name))
    expected = r"wandb package is not installed \(pip install 'megasmol\[wandb\]'\)"
    with pytest.raises(ConfigError, match=expected):
        trackers._require("wandb")
