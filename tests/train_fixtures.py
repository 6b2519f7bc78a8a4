"""A small training run on disk (a tiny spec with a 512-token vocabulary, two random datasets, a
config), and the ways the tests start, signal and kill ``megasmol train`` on it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import REPO, run_cli, run_torchrun
from tests.data_fixtures import EOS, random_documents, write_dataset

SPEC = dict(
    name="train-tiny", architecture="smollm3", num_layers=4, hidden_size=32, ffn_hidden_size=64,
    num_attention_heads=4, num_kv_heads=2, head_dim=8, vocab_size=512,
    max_position_embeddings=256, norm_eps=1e-6, rope_theta=10000.0, nope_interval=4,
    tie_embeddings=True, init_std=0.02, bos_token_id=1, eos_token_id=EOS, pad_token_id=None,
)


def _structured_documents(count, seed):
    # Learnable text: repeated short ramps, so the loss falls within a few dozen steps. Ids stay
    # below 260, so a batch of random ids over the whole vocabulary is a clear loss spike.
    import numpy as np

    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        start, length = int(rng.integers(0, 250)), int(rng.integers(20, 90))
        docs.append([10 + (start + i % 7) % 250 for i in range(length)])
    return docs


def write_training_run(root: Path, steps: int = 20, **sections) -> Path:
    """Write spec, data and config under ``root``; returns the config path.

    ``sections`` update the config's sections (e.g. ``checkpoint={"interval": 5}``).
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    data = root / "data"
    data.mkdir(exist_ok=True)
    write_dataset(data / "ramps", _structured_documents(600, seed=1))
    write_dataset(data / "noise", random_documents(300, 10, 260, 20, 80, seed=2))
    (root / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "two-stage", "root": "data",
        "stages": [
            {"name": "first", "start_step": 1, "datasets": [
                {"path": "ramps", "weight": 0.7}, {"path": "noise", "weight": 0.3}]},
            {"name": "second", "start_step": max(2, steps // 2 + 1), "datasets": [
                {"path": "ramps", "weight": 0.9}, {"path": "noise", "weight": 0.1}]},
        ]}))
    config = {
        "model": "spec.yaml",
        "run_dir": "run",
        "data": {"recipe": "recipe.yaml", "seq_length": 64, "validation_fraction": 0.05,
                 "prefetch": 0, "tokenizer": None},
        "training": {"train_steps": steps, "global_batch_size": 8, "micro_batch_size": 2,
                     "precision": "fp32", "seed": 7},
        "schedule": {"kind": "wsd", "lr": 1e-2, "warmup_steps": 3, "decay_fraction": 0.2},
        "checkpoint": {"interval": 5, "keep_last": 2},
        "logging": {"interval": 1, "tensorboard": False, "progress": False},
        "eval": {"interval": 10, "steps": 1},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def resumed_from(source_run: Path, iteration: str, root: Path, **sections) -> Path:
    """A run under ``root`` (``write_training_run(root, **sections)``) whose checkpoint directory
    holds ``source_run``'s checkpoint ``iteration`` as its latest: training it resumes from there."""
    import shutil

    config = write_training_run(root, **sections)
    ckpts = root / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / iteration, ckpts / iteration)
    (ckpts / "latest").write_text(f"{iteration}\n")
    return config


def step_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """Per-step training ``key`` from metrics.jsonl (a re-run step keeps its last value)."""
    import json

    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train" and record.get(key) is not None:
            values[record["step"]] = record[key]
    return values


def train(config, *sets, check=True, env_extra=None):
    args = ["train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]
    if env_extra:
        env = {**os.environ, **env_extra}
        return subprocess.run([sys.executable, "-m", "megasmol", *args], capture_output=True,
                              text=True, timeout=600, env=env, cwd=REPO)
    return run_cli(*args, check=check)


def start_train(config, *sets, env_extra=None):
    """A training process in its own session, so a kill can take all its children too."""
    cmd = [sys.executable, "-m", "megasmol", "train", "--config", str(config),
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, **(env_extra or {})}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_session(proc, marker: str | None = None):
    """Like Slurm killing a job's cgroup: the trainer and any helper process it started. With
    ``marker`` (the value of ``MEGASMOL_TEST_RUN`` in the job's environment), also every process
    that inherited it: a launcher starts each rank in a session of its own, and a rank killed by
    its monitor leaves its helpers behind, outside any group left to kill."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    if marker is None:
        return
    import psutil

    for other in psutil.process_iter():
        try:
            if other.environ().get("MEGASMOL_TEST_RUN") == marker:
                other.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass


def torchrun_train(config, *sets):
    return run_torchrun(["-m", "megasmol", "train", "--config", str(config),
                         *[a for s in sets for a in ("--set", s)]])


def wait_for_step(proc, run_dir, step, timeout=300, committed=False):
    """Until the run logged ``step`` (and, with ``committed``, a checkpoint is complete)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        ready = not committed or (run_dir / "checkpoints" / "latest").exists()
        if ready and (run_dir / "metrics.jsonl").exists() and max(step_losses(run_dir), default=0) >= step:
            return
        time.sleep(0.02)
