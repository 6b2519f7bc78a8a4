"""A small training run on disk: a tiny spec (vocabulary 512), two random datasets, a config."""

from pathlib import Path

import yaml

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


def step_losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """Per-step training ``key`` from metrics.jsonl (a re-run step keeps its last value)."""
    import json

    values = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train" and record.get(key) is not None:
            values[record["step"]] = record[key]
    return values
