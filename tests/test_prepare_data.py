"""prepare-data: Megatron-readable output, identical across worker modes, honest about bad input."""

import gzip
import json

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megasmol.config.typed import ConfigError
from megasmol.data.tokenize import prepare_data
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def small_tokenizer_dir(tmp_path_factory):
    """A real (tiny) word-level tokenizer saved as a local HF directory: vocab < 65536."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>"] + "the cat sat on a mat dog ran far".split()
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>")
    out = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(out)
    return out


def _write_inputs(root):
    (root / "a.jsonl").write_text(
        json.dumps({"text": "the cat sat"}) + "\n"
        + "{not json\n"
        + json.dumps({"content": "no text key"}) + "\n"
        + json.dumps({"text": "   "}) + "\n"
        + json.dumps({"text": "a dog ran far"}) + "\n")
    (root / "b.txt").write_bytes(b"the mat\n" + b"\xff\xfe on a cat")  # invalid UTF-8
    (root / "empty.jsonl").write_text("")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["dog sat on the mat", None]}), root / "c.parquet")
    return ["the cat sat", "a dog ran far", "the mat\n\ufffd\ufffd on a cat", "dog sat on the mat"]


def test_round_trip_counts_and_worker_modes(tmp_path, small_tokenizer_dir):
    from transformers import AutoTokenizer

    expected_texts = _write_inputs(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(small_tokenizer_dir))
    outputs = {}
    for workers in (1, 2):
        prefix = tmp_path / f"out{workers}"
        inputs = [str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "c.parquet")]
        summary = prepare_data(inputs, str(prefix), tokenizer=str(small_tokenizer_dir), workers=workers,
                               show_progress=False)
        assert summary.dtype == "uint16"  # a 11-id vocabulary fits
        assert summary.documents == 4
        assert summary.skipped == {"malformed_json": 1, "missing_text_key": 1, "empty_text": 2,
                                   "invalid_utf8_replaced": 1, "empty_file": 1}
        assert summary.skipped_examples["malformed_json"].endswith("a.jsonl:2")
        data = IndexedDataset(str(prefix))
        outputs[workers] = [data[i].tolist() for i in range(len(data))]
        stats = json.loads((tmp_path / f"out{workers}.stats.json").read_text())
        assert stats["tokens"] == sum(len(d) for d in outputs[workers]) == summary.tokens
        assert not list(tmp_path.glob("*.partial"))
    assert outputs[1] == outputs[2]
    eos = tok.eos_token_id
    for doc, text in zip(outputs[1], expected_texts):
        assert doc == tok(text, add_special_tokens=False)["input_ids"] + [eos]


def test_llama_tokenizer_output_is_megatron_int32(tmp_path, llama_tokenizer_dir):
    from transformers import AutoTokenizer

    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "SmolLM3 is a 3B model."}) + "\n")
    summary = prepare_data([str(tmp_path / "d.jsonl")], str(tmp_path / "llama"), show_progress=False)
    tok = AutoTokenizer.from_pretrained(str(llama_tokenizer_dir))
    data = IndexedDataset(str(tmp_path / "llama"))
    assert data.index.dtype == np.int32 and summary.eos_id == 128001
    assert data[0].tolist() == tok("SmolLM3 is a 3B model.", add_special_tokens=False)["input_ids"] + [128001]


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, small_tokenizer_dir):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "the cat"}) + "\n")
    corrupt = tmp_path / "z.jsonl.gz"
    corrupt.write_bytes(b"this is not gzip")
    prefix = tmp_path / "out"
    with pytest.raises(ConfigError, match="z.jsonl.gz: cannot read"):
        prepare_data([str(good), str(corrupt)], str(prefix), tokenizer=str(small_tokenizer_dir),
                     show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.jsonl", "z.jsonl.gz"]
    # Counted and skipped on request.
    summary = prepare_data([str(good), str(corrupt)], str(prefix), tokenizer=str(small_tokenizer_dir),
                           skip_bad_files=True, show_progress=False)
    assert summary.documents == 1 and "z.jsonl.gz" in summary.bad_files[0]
    with pytest.raises(FileExistsError, match="out.idx"):
        prepare_data([str(good)], str(prefix), tokenizer=str(small_tokenizer_dir), show_progress=False)
    with pytest.raises(ConfigError, match="no such file"):
        prepare_data([str(tmp_path / "missing.jsonl")], str(tmp_path / "x"), show_progress=False)
    with pytest.raises(ConfigError, match="--workers must be >= 1, got 0"):
        prepare_data([str(good)], str(tmp_path / "x"), workers=0, show_progress=False)
    with pytest.raises(ConfigError, match="does not fit uint16"):
        prepare_data([str(good)], str(tmp_path / "x"), dtype="uint16", show_progress=False)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(ConfigError, match="p.parquet: no column 'text'"):
        prepare_data([str(tmp_path / "p.parquet")], str(tmp_path / "x"),
                     tokenizer=str(small_tokenizer_dir), show_progress=False)
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{broken\n")
    with pytest.raises(ConfigError, match="no documents.*malformed_json=1"):
        prepare_data([str(only_bad)], str(tmp_path / "x"), tokenizer=str(small_tokenizer_dir),
                     show_progress=False)
    assert not list(tmp_path.glob("x*"))


def test_cli_prepare_data(tmp_path, small_tokenizer_dir):
    src = tmp_path / "in.jsonl.gz"
    with gzip.open(src, "wt") as handle:
        handle.write(json.dumps({"body": "a cat ran"}) + "\n")
    proc = run_cli("prepare-data", "--input", str(src), "--out", str(tmp_path / "cli"),
                   "--tokenizer", str(small_tokenizer_dir), "--text-key", "body", "--quiet")
    assert "documents  1" in proc.stdout and "tokens/s" in proc.stdout
    proc = run_cli("prepare-data", "--input", str(tmp_path / "nope.jsonl"), "--out",
                   str(tmp_path / "cli2"), check=False)
    assert proc.returncode == 2 and "nope.jsonl: no such file" in proc.stderr
