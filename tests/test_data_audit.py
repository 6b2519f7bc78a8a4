"""data-audit: epochs per dataset and stage, and the errors that must stop a run."""

import json
import os

import numpy as np
import pytest
import yaml

from megasmol.config.run import load_run_config
from megasmol.data.audit import audit_plan, audit_run
from megasmol.data.recipe import plan_stages
from tests.conftest import cli_in_process, run_cli
from tests.data_fixtures import EOS, recipe_at, write_dataset


def test_epochs_and_warnings(tmp_path):
    write_dataset(tmp_path / "big", [[5] * 999] * 10)     # 10,000 tokens
    write_dataset(tmp_path / "small", [[6] * 99] * 10)    # 1,000 tokens
    recipe = recipe_at(tmp_path, [
        {"name": "a", "start_step": 1, "datasets": [{"path": "big", "weight": 0.6},
                                                    {"path": "small", "weight": 0.3}]},
        {"name": "b", "start_step": 11, "datasets": [{"path": "big", "weight": 1.0}]}])
    plans = plan_stages(recipe, 20, 4, 50)  # 10 steps x 200 tokens per stage
    report = audit_plan(recipe, plans, vocab_size=100, eos_id=EOS, max_epochs=0.5)
    rows = {(r.stage, r.name): r for r in report.rows}
    assert rows["a", "small"].tokens_drawn == round(2000 / 0.9 * 0.3)
    assert rows["a", "small"].epochs == pytest.approx(2000 / 0.9 * 0.3 / 1000, rel=1e-3)
    assert rows["b", "big"].epochs_all_stages == pytest.approx((2000 / 0.9 * 0.6 + 2000) / 10_000, rel=1e-3)
    assert report.ok
    assert any("weights sum to 0.90000" in w for w in report.warnings)
    assert any(w.startswith("small: drawn 0.7 times") for w in report.warnings)
    text = report.render()
    assert "epochs" in text and "audit: OK, 2 warning(s)" in text


def test_errors_stop_the_run(tmp_path):
    write_dataset(tmp_path / "wide", [[5, 7000, 6]])  # id 7000: outside a 4096 vocabulary
    write_dataset(tmp_path / "ok", [[5, 6]])
    (tmp_path / "ok.stats.json").write_text(json.dumps({"eos_id": 0, "max_token_id": 6}))
    recipe = recipe_at(tmp_path, [{"name": "a", "start_step": 1, "datasets": [
        {"path": "wide", "weight": 0.5}, {"path": "ok", "weight": 0.25}, {"path": "gone", "weight": 0.25}]}])
    report = audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS)
    errors = "\n".join(report.errors)
    assert not report.ok and len(report.errors) == 3, errors
    assert "token id 7000" in errors and "gone.bin/.idx" in errors and "end with token 0" in errors


def test_cli_data_audit_exit_codes(tmp_path):
    write_dataset(tmp_path / "d", [[5] * 50] * 20)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "root": ".", "stages": [
        {"name": "s", "start_step": 1, "datasets": [{"path": "d", "weight": 1.0}]}]}))
    config = {"model": "smollm3-tiny", "data": {"recipe": "recipe.yaml", "seq_length": 16},
              "training": {"train_steps": 4, "global_batch_size": 2},
              "schedule": {"warmup_steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    report = audit_run(load_run_config(tmp_path / "run.yaml"))
    assert report.ok and report.rows[0].tokens_available == int(1020 * 0.99)
    proc = run_cli("data-audit", "--config", str(tmp_path / "run.yaml"))
    assert proc.returncode == 0 and "audit: OK" in proc.stdout
    proc = cli_in_process("data-audit", "--config", str(tmp_path / "run.yaml"), "--set", "data.root=/nowhere")
    assert proc.returncode == 1 and "missing /nowhere/d.bin/.idx" in proc.stdout
    proc = run_cli("data-audit", "--config", str(tmp_path / "run.yaml"), "--set", "training.gbs=3",
                   check=False)
    assert proc.returncode == 2 and "unknown field(s) training.gbs" in proc.stderr
    assert np.iinfo(np.int32).max > 7000


def test_every_id_is_checked_and_the_verdict_cached(tmp_path, monkeypatch):
    """An out-of-vocabulary id in the middle, behind a stale stats JSON, used to pass the audit
    and crash training at the first batch that held it."""
    import megasmol.data.audit as audit

    documents = [[5] * 100] * 50
    documents[25] = [5, 7000, 6]
    write_dataset(tmp_path / "d", documents)
    (tmp_path / "d.stats.json").write_text(json.dumps({"eos_id": EOS, "max_token_id": 6}))
    recipe = recipe_at(tmp_path, [{"name": "a", "start_step": 1, "datasets": [{"path": "d", "weight": 1}]}])
    cache = tmp_path / "cache" / "token_scan.json"
    report = audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS, scan_cache=cache)
    assert report.errors == [f"{tmp_path / 'd'}: token id 7000 (in {tmp_path / 'd'}.bin) is outside "
                             "the model's vocabulary of 4096"]
    # Unchanged files are not read again; a rewritten one is.
    monkeypatch.setattr(audit, "_scan_id_range", lambda *a: pytest.fail("scanned again"))
    audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS, scan_cache=cache)
    monkeypatch.undo()
    write_dataset(tmp_path / "d", [[5] * 100] * 50)
    report = audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS, scan_cache=cache)
    assert report.ok, report.errors
    # A negative id rewritten in place, same size, with the modification time put back: the scan
    # cache is not fooled (its key has the status-change time), and a negative id is an error.
    stat = os.stat(tmp_path / "d.bin")
    with open(tmp_path / "d.bin", "r+b") as handle:
        handle.seek(4 * 1000)
        handle.write(np.array([-3], dtype=np.int32).tobytes())
    os.utime(tmp_path / "d.bin", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert os.stat(tmp_path / "d.bin").st_mtime_ns == stat.st_mtime_ns
    report = audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS, scan_cache=cache)
    assert [e for e in report.errors if "token id -3" in e and "negative" in e], report.errors


def test_a_truncated_bin_is_named(tmp_path):
    write_dataset(tmp_path / "d", [[5] * 100] * 50)
    data = (tmp_path / "d.bin").read_bytes()
    (tmp_path / "d.bin").write_bytes(data[:-40])  # a whole number of int32 tokens short
    recipe = recipe_at(tmp_path, [{"name": "a", "start_step": 1, "datasets": [{"path": "d", "weight": 1}]}])
    report = audit_plan(recipe, plan_stages(recipe, 5, 2, 8), vocab_size=4096, eos_id=EOS)
    [error] = report.errors
    assert f"{tmp_path / 'd'}.bin has {len(data) - 40:,} bytes" in error and "truncated" in error
