"""Experiment trackers behind one interface: TensorBoard, Weights & Biases, MLflow, trackio.

``metrics.jsonl`` is the source of truth and is always written; trackers receive the same
records (numbers only, as ``KIND/KEY`` at the record's step) on rank 0. A restarted run continues
the same tracker run: the ids are kept in ``<run_dir>/trackers.json``. Each backend but
TensorBoard is an optional extra (``pip install megasmol[wandb]``, ``[mlflow]``, ``[trackio]``);
selecting one that is not installed is one error naming the package.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Optional

from megasmol.config.typed import ConfigError

log = logging.getLogger(__name__)
IDS_FILE = "trackers.json"
PACKAGES = {"wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def scalars(kind: str, record: dict) -> dict[str, float]:
    """The record's finite numbers as ``KIND/KEY`` (the step itself excluded)."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
    return out


class _Ids:
    """Tracker run ids of this run directory, so a restart resumes the same tracker runs."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / IDS_FILE
        self.ids = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, backend: str, make) -> str:
        if backend not in self.ids:
            from megasmol.utils.fs import atomic_write_text

            self.ids[backend] = make()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps(self.ids, indent=2))
        return self.ids[backend]


def _require(backend: str):
    import importlib

    try:
        return importlib.import_module(PACKAGES[backend])
    except ImportError:
        raise ConfigError(f"logging.trackers: {backend} is selected but the {PACKAGES[backend]} "
                          f"package is not installed (pip install 'megasmol[{backend}]')") from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path, **_):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, kind: str, record: dict) -> None:
        for key, value in scalars(kind, record).items():
            self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Honours ``WANDB_MODE`` (``offline`` writes under ``<run_dir>/wandb`` for ``wandb sync``)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, ids: _Ids):
        os.environ.setdefault("WANDB_SILENT", "true")  # its banners would fill the console
        wandb = _require("wandb")
        run_id = ids.get("wandb", lambda: uuid.uuid4().hex[:12])
        self.run = wandb.init(project=project, name=name, id=run_id, resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, kind: str, record: dict) -> None:
        values = scalars(kind, record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """A local file store (``<run_dir>/mlruns``) unless ``logging.mlflow_tracking_uri`` or
    ``MLFLOW_TRACKING_URI`` names another store (``sqlite:///...``) or a server. MLflow 3 reads a
    file store only with ``MLFLOW_ALLOW_FILE_STORE=true`` (the trainer sets it for itself; a user
    reading the store sets it too: ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri
    RUN/mlruns``), or use ``sqlite:///RUN/mlflow.db`` (needs the full ``mlflow`` package)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, ids: _Ids,
                 tracking_uri: Optional[str] = None):
        mlflow = _require("mlflow")
        from mlflow.tracking import MlflowClient

        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:  # MLflow's file backend: in maintenance upstream, but needs no database
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            log.info("mlflow: file store %s (read it with MLFLOW_ALLOW_FILE_STORE=true mlflow ui "
                     "--backend-store-uri %s)", uri, uri)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(project)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(project))

        def create() -> str:
            run = self.client.create_run(experiment_id, run_name=name)
            return run.info.run_id

        self.run_id = ids.get("mlflow", create)
        self.mlflow = mlflow
        flat = {k: str(v)[:500] for k, v in _flatten(config).items()}
        if not self.client.get_run(self.run_id).data.params:
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in flat.items()]
            for start in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[start:start + 100])

    def log(self, kind: str, record: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, value, now, record["step"]) for key, value in scalars(kind, record).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    """Local by default (trackio's directory: ``TRACKIO_DIR`` or the Hugging Face cache)."""

    def __init__(self, run_dir: Path, project: str, name: str, config: dict, ids: _Ids):
        self.trackio = _require("trackio")
        ids.get("trackio", lambda: name)
        with _quiet("trackio init"):
            self.trackio.init(project=project, name=name, config=config, resume="allow")

    def log(self, kind: str, record: dict) -> None:
        values = scalars(kind, record)
        if values:
            self.trackio.log(values, step=record["step"])

    def close(self) -> None:
        with _quiet("trackio finish"):
            self.trackio.finish()


@contextlib.contextmanager
def _quiet(what: str):
    """A library's banners go to megasmol's debug log, not the console."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        yield
    if captured.getvalue().strip():
        log.debug("%s: %s", what, captured.getvalue().strip())


BACKENDS = {"wandb": WandbTracker, "mlflow": MlflowTracker, "trackio": TrackioTracker}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_trackers(logging_config, run_dir: Path, config: dict) -> list:
    """The selected trackers (rank 0 only); TensorBoard with ``logging.tensorboard``."""
    trackers = [TensorBoardTracker(run_dir)] if logging_config.tensorboard else []
    if not logging_config.trackers:
        return trackers
    ids = _Ids(run_dir)
    project = logging_config.project or run_dir.parent.name or "megasmol"
    name = logging_config.run_name or run_dir.name
    for backend in logging_config.trackers:
        options = {"tracking_uri": logging_config.mlflow_tracking_uri} if backend == "mlflow" else {}
        trackers.append(BACKENDS[backend](run_dir, project, name, config, ids, **options))
    return trackers
