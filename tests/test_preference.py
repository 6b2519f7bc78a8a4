"""Preference training on megasmol's engine: packed pairs train equally on every parallel layout;
reference log-probs are computed once, reused on rerun and resume, keyed by the reference; the
whole SFT -> APO -> merge -> export -> generate path."""

import json
import os
import random
import shutil

import numpy as np
import pytest

from megasmol.data.preference.prepare import prepare_preferences
from megasmol.model.init import init_checkpoint
from tests.conftest import cli_in_process, run_cli, run_torchrun
from tests.specs import tiny_smollm3
from tests.test_preference_data import _msg, _write
from tests.train_fixtures import step_losses


@pytest.fixture(scope="module")
def pref_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    init_checkpoint(tiny_smollm3(), root / "sft", seed=5)
    rng = random.Random(0)
    records = []
    for _ in range(24):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        records.append({"prompt": [_msg("user", f"What is {a} + {b}?")],
                        "chosen": [_msg("assistant", f"{a} + {b} = {a + b}.")],
                        "rejected": [_msg("assistant",
                                          f"I think {a} + {b} is {a + b + rng.randint(1, 5)}.")]})
    _write(root / "pairs.jsonl", records)
    prepare_preferences([str(root / "pairs.jsonl")], str(root / "data" / "pref"), template="chatml",
                        show_progress=False)
    (root / "recipe.yaml").write_text("name: pref\nroot: data\nstages:\n  - name: apo\n    start_step: 1\n"
                                      "    datasets:\n      - {path: pref, weight: 1.0}\n")
    (root / "apo.yaml").write_text(
        "run_dir: run\ncheckpoint: {init_from: sft, interval: 0}\n"
        "data: {recipe: recipe.yaml, seq_length: 128, validation_fraction: 0.15}\n"
        "training: {train_steps: 3, global_batch_size: 2, micro_batch_size: 1, precision: fp32, "
        "attention_backend: sdpa}\n"
        "schedule: {kind: cosine, lr: 1.0e-3, warmup_steps: 0}\n"
        "preference: {loss_type: apo_zero, beta: 0.1}\nlogging: {interval: 1, progress: false}\n"
        "eval: {interval: 3, steps: 1}\n")
    # Saved at step 2 too (the config saves at the end only): the resume test starts there.
    out = run_cli("train", "--config", str(root / "apo.yaml"), "--set", "checkpoint.interval=2").stdout
    return root, out


def _metrics(run_dir):
    keys = ("loss", "grad_norm", "rewards/margins", "rewards/accuracies", "logps/chosen")
    return {k: step_losses(run_dir, k) for k in keys}


def test_first_step_loss_and_metrics_of_a_packed_run(pref_run):
    root, out = pref_run
    assert "scored by" in out and "24 pairs" in out  # the reference pass ran once, over every pair
    metrics = _metrics(root / "run")
    assert metrics["loss"][1] == pytest.approx(1.0, abs=1e-9)  # APO-zero at policy = reference
    assert metrics["rewards/margins"][1] == pytest.approx(0.0, abs=1e-9)
    assert metrics["rewards/margins"][3] > 0  # the policy moves toward the chosen answers
    assert metrics["logps/chosen"][1] < 0
    # The held-out pairs report TRL's metrics too, and compare shows them.
    (validation,) = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()
                     if json.loads(line)["kind"] == "validation"]
    assert validation["pairs"] > 0 and 0 <= validation["rewards/accuracies"] <= 1
    table = run_cli("compare", str(root / "run"), "--out", str(root / "cmp")).stdout
    assert "val reward acc" in table and f"{validation['rewards/accuracies']:.4f}" in table


def test_every_parallel_layout_trains_as_one_process(pref_run):
    """PP=2, CP=2 and DP=2 (distributed optimizer) each recompute the reference log-probs in their
    own layout and train the same steps as one process (the validation too). TP=2 is left out to
    keep the suite short: its per-token losses are vocabulary-parallel CE, checked under TP by the
    training, SFT and scoring layout tests, and a pair's sums are the same on every TP rank."""
    root, _ = pref_run
    (single,) = list((root / "data").glob("pref.ref-*.npy"))
    expected_ref = np.load(single)
    expected = _metrics(root / "run")
    # CP=2 also with 2-row micro-batches: the reference pass groups rows, the loss does not care.
    for layout, micro in (("pipeline_parallel=2", 1), ("context_parallel=2", 2), ("context_parallel=1", 1)):
        single.unlink()
        run_dir = root / f"run-{layout.replace('=', '')}"
        run_torchrun(["-m", "megasmol", "train", "--config", str(root / "apo.yaml"),
                      "--set", f"run_dir={run_dir}", "--set", f"parallel.{layout}",
                      "--set", f"training.micro_batch_size={micro}", "--set", "checkpoint.save_at_end=false"])
        np.testing.assert_allclose(np.load(single), expected_ref, rtol=1e-6, err_msg=layout)
        got = _metrics(run_dir)
        for key, values in expected.items():
            for step, value in values.items():
                assert got[key][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (layout, key, step)


def test_chunked_cross_entropy_trains_as_plain(pref_run):
    """``training.cross_entropy: chunked`` at SmolLM3's 128k vocabulary: the per-token CE that the
    preference loss sums per document is the plain path's, so every metric is too."""
    root, _ = pref_run
    expected = _metrics(root / "run")
    run_dir = root / "run-chunked"
    run_cli("train", "--config", str(root / "apo.yaml"), "--set", f"run_dir={run_dir}",
            "--set", "training.cross_entropy=chunked", "--set", "checkpoint.save_at_end=false")
    got = _metrics(run_dir)
    # The reference log-probs are the plain path's; rewards and the loss are beta x differences of
    # log-prob sums near 100 (fp32 rounding ~1e-5 each), hence an absolute 1e-6 where they are ~0.
    for key, values in expected.items():
        for step, value in values.items():
            assert got[key][step] == pytest.approx(value, rel=1e-5, abs=1e-6), (key, step)
    assert got["loss"][3] != expected["loss"][3]  # the chunked path ran: not bit-identical


def test_reference_logps_are_reused_on_resume_and_keyed_by_the_reference(pref_run):
    import torch

    from megasmol.train.reference import reference_key

    root, _ = pref_run
    before = sorted((root / "data").glob("pref.ref-*.npy"))
    # A run whose latest checkpoint is the fixture's step 2: it resumes there, in one process.
    checkpoints = root / "run-resume" / "checkpoints"
    shutil.copytree(root / "run" / "checkpoints" / "iter_0000002", checkpoints / "iter_0000002")
    (checkpoints / "latest").write_text("iter_0000002\n")
    resumed = run_cli("train", "--config", str(root / "apo.yaml"),
                      "--set", f"run_dir={root}/run-resume").stdout
    assert "resumed from" in resumed and "reusing pref.ref-" in resumed
    assert "scored by" not in resumed
    assert sorted((root / "data").glob("pref.ref-*.npy")) == before
    whole = step_losses(root / "run")
    assert step_losses(root / "run-resume") == pytest.approx({3: whole[3]}, abs=1e-9)
    # Another reference, or another precision, names another file (computed when first needed,
    # as the fixture's run did).
    prefix = str(root / "data" / "pref")
    key = reference_key(prefix, root / "sft", torch.float32)
    assert before == [root / "data" / f"pref.ref-{key}.npy"]
    assert reference_key(prefix, root / "run" / "checkpoints", torch.float32) != key
    assert reference_key(prefix, root / "sft", torch.bfloat16) != key


def test_preference_config_mistakes_are_one_line(pref_run):
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError

    root, _ = pref_run
    no_reference = run_cli("train", "--config", str(root / "apo.yaml"), "--set", f"run_dir={root}/run-bad",
                           "--set", "checkpoint.init_from=null", "--set", "model=smollm3-tiny", check=False)
    assert no_reference.returncode == 2
    assert "preference data need a reference model" in no_reference.stderr
    assert "Traceback" not in no_reference.stderr
    with pytest.raises(ConfigError, match="preference.beta must be > 0"):
        load_run_config(root / "apo.yaml", ["preference.beta=0"])
    with pytest.raises(ConfigError, match="preference.loss_type"):
        load_run_config(root / "apo.yaml", ["preference.loss_type=kto"])


def test_a_preference_section_over_plain_tokens_is_refused(pref_run, tmp_path):
    """``preference:`` makes ``preference`` the default objective; over data that are not pairs the
    run is refused in one line naming the field and the data, before anything trains."""
    from tests.data_fixtures import random_documents, write_dataset

    root, _ = pref_run
    (tmp_path / "data").mkdir()
    write_dataset(tmp_path / "data" / "plain", random_documents(40, 3, 200, 20, 60, seed=1))
    (tmp_path / "plain.yaml").write_text("name: plain\nroot: data\nstages:\n  - name: lm\n    start_step: 1\n"
                                         "    datasets:\n      - {path: plain, weight: 1.0}\n")
    proc = run_cli("train", "--config", str(root / "apo.yaml"), "--set", f"run_dir={tmp_path}/run",
                   "--set", f"data.recipe={tmp_path}/plain.yaml", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("megasmol train: error: training.objective=preference (the default with a "
                           "preference: section) trains on preference pairs (`megasmol "
                           "prepare-preferences` output), but data recipe plain reads "
                           f"{tmp_path}/data/plain, which is not: it is token or chat data")
    assert line.endswith("or set training.objective: next_token (and no preference: section)")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def _error_lines(proc):
    """The run's error lines (its log's INFO lines aside)."""
    return [line for line in proc.stderr.splitlines() if "error" in line]


def _truncated_copy(checkpoint, dest):
    """A copy of ``checkpoint`` whose largest shard is cut in half (the weights' file)."""
    shutil.copytree(checkpoint, dest)
    shard = max((dest / "iter_0000000").glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])
    return shard


def test_the_reference_key_follows_the_checkpoints_bytes_not_its_file_sizes(pref_run, tmp_path):
    """Shards replaced in place (same names, same sizes, even the same mtime) are another
    reference: another key, so the stale log-probs are not reused. The same bytes elsewhere are
    the same reference."""
    import torch

    from megasmol.ckpt.checkpoint import CheckpointError
    from megasmol.ckpt.storage import stored_items
    from megasmol.train.reference import reference_key, weights_digest

    root, _ = pref_run
    prefix = str(root / "data" / "pref")
    key = reference_key(prefix, root / "sft", torch.float32)
    shutil.copytree(root / "sft", tmp_path / "sft")
    iteration = tmp_path / "sft" / "iter_0000000"
    meta = json.loads((iteration / "megasmol.json").read_text())  # a trained run's records its
    meta["run_config"] = {"run_dir": str(tmp_path / "elsewhere")}   # settings and paths
    (iteration / "megasmol.json").write_text(json.dumps(meta))
    assert reference_key(prefix, tmp_path / "sft", torch.float32) == key
    (item,) = [i for i in stored_items(iteration) if i.fqn == "embedding.word_embeddings.weight"]
    shard = iteration / item.file
    before = shard.stat()
    with open(shard, "r+b") as handle:
        handle.seek(item.offset + item.length // 2)
        byte = handle.read(1)[0]
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte ^ 0xFF]))
    os.utime(shard, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert shard.stat().st_size == before.st_size and shard.stat().st_mtime_ns == before.st_mtime_ns
    assert reference_key(prefix, tmp_path / "sft", torch.float32) != key
    # A reference cut short is named, not hashed as it is.
    cut = _truncated_copy(root / "sft", tmp_path / "cut")
    with pytest.raises(CheckpointError, match=f"{cut} ends early \\(truncated\\?\\): copy the reference"):
        weights_digest(tmp_path / "cut")


def test_changed_reference_logps_are_refused_not_trained_against(pref_run, tmp_path):
    """Every chosen log-prob +5 in a well-formed file of the same size (APO-zero's step-1 loss
    would read 1.122, not 1): its sha256 no longer matches the record written with it, and the
    run stops with one line naming the file. A cut-short file says so."""
    from megasmol.config.typed import ConfigError
    from megasmol.train.reference import load_reference_logps, record_path

    root, _ = pref_run
    shutil.copytree(root / "data", tmp_path / "data")  # the same bytes: the same key, file reused
    shutil.copy(root / "recipe.yaml", tmp_path / "recipe.yaml")
    (saved,) = (tmp_path / "data").glob("pref.ref-*.npy")
    assert json.loads(record_path(saved).read_text())["pairs"] == 24
    values = np.load(saved)
    values[:, 0] += 5.0
    size = saved.stat().st_size
    np.save(saved, values)
    assert saved.stat().st_size == size
    proc = run_cli("train", "--config", str(root / "apo.yaml"), "--set", f"run_dir={tmp_path}/run",
                   "--set", f"data.recipe={tmp_path}/recipe.yaml",
                   "--set", f"checkpoint.init_from={root}/sft", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _error_lines(proc) == [
        f"megasmol train: error: {saved}: not the reference log-probs megasmol computed (its sha256 "
        f"differs from the one {record_path(saved).name} recorded: edited or damaged); delete it to "
        "recompute them"]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    saved.write_bytes(saved.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=f"{saved} ends early \\({size - 8:,} of {size:,} bytes; "
                                          "truncated\\?\\): delete it to recompute"):
        load_reference_logps(saved, 24)


def test_a_truncated_reference_checkpoint_is_named_in_one_line(pref_run, tmp_path):
    """A shard cut in half made PyTorch's zip-archive error text; now the file is named, as a
    resume names a file that ends early, with what to do."""
    root, _ = pref_run
    shard = _truncated_copy(root / "sft", tmp_path / "sft")
    proc = run_cli("train", "--config", str(root / "apo.yaml"), "--set", f"run_dir={tmp_path}/run",
                   "--set", f"checkpoint.init_from={tmp_path}/sft", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert _error_lines(proc) == [
        f"megasmol train: error: {shard.parent}: cannot load model weights: {shard.name} ends early "
        "(truncated?): copy the checkpoint again from a complete one (a damaged file cannot be "
        "repaired in place)"]


def test_sft_to_apo_to_merge_to_export_to_transformers_generate(pref_run):
    """The whole post-training path with megasmol alone: the APO run's checkpoint, a 0.9 / 0.1
    linear merge with the SFT checkpoint, export with the chat template, transformers generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = pref_run
    assert cli_in_process("average", "--checkpoints", str(root / "run" / "checkpoints"), str(root / "sft"),
                          "--weights", "0.9", "0.1", "--out", str(root / "merged"), "--quiet").returncode == 0
    assert cli_in_process("export-hf", "--checkpoint", str(root / "merged"), "--out", str(root / "merged-hf"),
                          "--tokenizer", str(root / "data" / "pref.tokenizer"), "--chat-template", "chatml",
                          "--quiet").returncode == 0
    tokenizer = AutoTokenizer.from_pretrained(root / "merged-hf")
    model = AutoModelForCausalLM.from_pretrained(root / "merged-hf").eval()
    ids = tokenizer.apply_chat_template([_msg("user", "What is 2 + 3?")], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    assert tokenizer.decode(ids[0]).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]
