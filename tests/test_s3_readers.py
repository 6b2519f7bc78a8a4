"""The commands that read a checkpoint take it straight from a bucket (``s3://``), against a real
S3 server on the loopback interface (tests/s3_fixtures.py): ``eval tasks``, ``generate`` and
``chat --checkpoint``, and ``average --checkpoints``. Each downloads the checkpoint once into the
cache, checked against its manifest, and computes what the same command computes from the local
copy (export-hf and checkpoint.init_from / branch_from: tests/test_s3_checkpoints.py)."""

import json
from pathlib import Path

import pytest
import torch

from megasmol.ckpt.reader import CheckpointReader
from megasmol.ckpt.remote import RemoteCheckpoints
from tests.conftest import cli_in_process, run_cli


@pytest.fixture(scope="module")
def models(tmp_path_factory, llama_tokenizer_dir):
    """Two initialized smollm3-tiny checkpoints (4 layers) with the tokenizer stored beside them."""
    root = tmp_path_factory.mktemp("s3-readers")
    for name, seed in (("a", 3), ("b", 4)):
        assert cli_in_process("init", "--spec", "smollm3-tiny", "--out", str(root / name), "--seed",
                              str(seed), "--tokenizer", str(llama_tokenizer_dir)).returncode == 0
    return root


def _upload(s3, local: Path, prefix: str) -> str:
    RemoteCheckpoints(s3.url(prefix)).upload(local / "iter_0000000")
    return s3.url(prefix)


def _results(stdout: str) -> dict:
    written = Path(stdout.split("results: ")[1].split()[0])
    return json.loads(written.read_text())["results"]


def test_eval_generate_and_chat_read_the_bucket(models, s3, tmp_path):
    url = _upload(s3, models / "a", "models/a")
    evaluate = ("eval", "tasks", "--tasks", "demo_arithmetic", "--limit", "10", "--quiet")
    remote = run_cli(*evaluate, "--checkpoint", url, "--out", str(tmp_path / "remote"))
    cached = Path(remote.stdout.split(f"downloading {url}/iter_0000000 to ")[1].split()[0])
    assert (cached / "megasmol.json").is_file() and (cached / "tokenizer").is_dir()
    # The local copies' answers in this process (tests/conftest.py); the bucket's in fresh ones.
    local = cli_in_process(*evaluate, "--checkpoint", str(models / "a"), "--out", str(tmp_path / "local"))
    assert _results(remote.stdout) == _results(local.stdout)
    assert _results(remote.stdout)["demo_arithmetic"]["examples"] == 10

    generate = ("generate", "--prompt", "The quick brown fox", "--max-new-tokens", "6", "--show-ids")
    remote = run_cli(*generate, "--checkpoint", url + "/iter_0000000")
    assert "downloading" not in remote.stdout  # the cached copy, checked once
    local = cli_in_process(*generate, "--checkpoint", str(models / "a"))
    ids = remote.stdout.split("token ids:")[1].split()
    assert len(ids) == 5 + 6 and ids == local.stdout.split("token ids:")[1].split()

    chat = run_cli("chat", "--checkpoint", url, "--template", "chatml", "--message", "hi",
                   "--max-new-tokens", "6")
    replies = [line for line in chat.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 1 and "downloading" not in chat.stdout, chat.stdout


def test_average_reads_the_bucket(models, s3, tmp_path):
    urls = [_upload(s3, models / name, f"models/{name}") for name in ("a", "b")]
    out = run_cli("average", "--checkpoints", *urls, "--out", str(tmp_path / "avg"), "--quiet")
    assert out.stdout.count("downloading ") == 2
    readers = [CheckpointReader(models / name) for name in ("a", "b")]
    got = CheckpointReader(tmp_path / "avg")
    assert set(got.keys()) == set(readers[0].keys())
    for key in readers[0].keys():
        total = readers[0].read(key).to(torch.float64) * 0.5 + readers[1].read(key).to(torch.float64) * 0.5
        assert got.read(key).equal(total.to(readers[0].dtype(key))), key
