"""Long context: RoPE ABF stages through the config, CP guards, YaRN parity, the passkey eval."""

import json
import re

import pytest
import torch

from megasmol.ckpt.checkpoint import read_metadata
from megasmol.longctx.passkey import NEEDLE, build_prompt, evaluate, score
from megasmol.model.run_spec import run_model_spec
from tests.conftest import cli_in_process, run_cli, run_torchrun
from tests.specs import tiny_smollm3
from tests.train_fixtures import step_losses, write_training_run


def test_long_context_stage_changes_theta_and_length_and_export_follows(tmp_path):
    # The previous stage's checkpoint: an initial one (init_from takes weights only, trained or
    # not, so training one first adds nothing here).
    write_training_run(tmp_path / "base")
    assert cli_in_process("init", "--spec", str(tmp_path / "base" / "spec.yaml"),
                          "--out", str(tmp_path / "base" / "init")).returncode == 0
    # The CPU-sized SmolLM3 procedure: weights only, 4x the length, 100x theta, fresh cosine.
    extended = write_training_run(
        tmp_path / "long", steps=6, eval={"interval": 0},
        data={"seq_length": 256}, rope={"theta": 1.0e6, "max_position_embeddings": 256},
        schedule={"kind": "cosine", "lr": 1e-3, "warmup_steps": 2, "decay_fraction": None},
        checkpoint={"init_from": str(tmp_path / "base" / "init"), "interval": 0})
    run_cli("train", "--config", str(extended))
    assert sorted(step_losses(tmp_path / "long" / "run")) == list(range(1, 7))
    meta = read_metadata(tmp_path / "long" / "run" / "checkpoints")
    assert meta["model_spec"]["rope_theta"] == 1.0e6
    assert meta["run_config"]["data"]["seq_length"] == 256
    assert cli_in_process("export-hf", "--checkpoint", str(tmp_path / "long" / "run" / "checkpoints"),
                          "--out", str(tmp_path / "hf")).returncode == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 1.0e6


@pytest.mark.parametrize("override,message", [
    ("data.seq_length=512", "exceeds the model's max_position_embeddings 256"),
    ("rope.theta=0", "rope.theta must be > 0"),
])
def test_long_context_settings_are_validated(tmp_path, override, message):
    config = write_training_run(tmp_path, steps=4, eval={"interval": 0})
    # In this process: the length is checked against the model once Megatron-Core is loaded
    # (5 s of imports in a process of its own).
    proc = cli_in_process("train", "--config", str(config), "--set", override)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_context_parallel_is_refused_on_the_local_attention(tmp_path):
    config = write_training_run(tmp_path, steps=4, eval={"interval": 0})
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec.read_text() + "attention_backend: local\n")
    # In one process the layout is refused first (it needs torchrun with 2 processes); the
    # attention check, which runs before any rendezvous under torchrun, is called as training does.
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError
    from megasmol.train.setup import check_attention_layout

    loaded = load_run_config(config, ["parallel.context_parallel=2"])
    with pytest.raises(ConfigError, match="Megatron-Core's local attention has none"):
        check_attention_layout(loaded, run_model_spec(loaded).attention_backend)
    proc = run_cli("train", "--config", str(config), "--set", "parallel.context_parallel=2", check=False)
    assert proc.returncode == 2 and "torchrun --nproc_per_node 2" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_causal_context_parallel_matches_one_rank(tmp_path):
    """CP=2 on the sdpa backend (all-gather KV, load-balanced chunks) without document masks:
    the same losses and clipped grad norms as one rank. The document-masked case runs with the
    other two-process layouts in test_train.py."""
    sections = dict(eval={"interval": 0}, data={"document_masking": False},
                    checkpoint={"interval": 0})
    single = write_training_run(tmp_path / "one", steps=8, **sections)
    assert cli_in_process("init", "--spec", str(tmp_path / "one" / "spec.yaml"),
                          "--out", str(tmp_path / "init")).returncode == 0
    run_cli("train", "--config", str(single), "--set", f"checkpoint.init_from={tmp_path / 'init'}")
    split = write_training_run(tmp_path / "cp", steps=8, **sections)
    run_torchrun(["-m", "megasmol", "train", "--config", str(split), "--set", "parallel.context_parallel=2",
                  "--set", f"checkpoint.init_from={tmp_path / 'init'}"])
    for key in ("loss", "grad_norm"):
        reference = step_losses(tmp_path / "one" / "run", key)
        losses = step_losses(tmp_path / "cp" / "run", key)
        assert sorted(losses) == list(range(1, 9))
        for step, value in reference.items():
            assert losses[step] == pytest.approx(value, rel=1e-4), (key, step)


def test_yarn_megatron_matches_transformers_beyond_the_original_context(tmp_path):
    """Settings that make the two agree: Megatron yarn_mscale=1, yarn_mscale_all_dim=0 (HF's
    attention factor 0.1 ln(s) + 1) and a correction range rounded to integers (HF truncate)."""
    from transformers import AutoModelForCausalLM

    from megasmol.convert.export import export_hf
    from megasmol.model.init import init_checkpoint
    from megasmol.model.load import load_checkpoint_model
    from megasmol.model.spec import YarnSpec

    spec = tiny_smollm3(max_position_embeddings=128,
                        yarn=YarnSpec(factor=2.0, original_max_position_embeddings=64).__dict__)
    init_checkpoint(spec, tmp_path / "ckpt")
    model, _, _ = load_checkpoint_model(tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf", show_progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids = torch.randint(0, 5000, (1, 120))  # beyond the original 64 positions
    with torch.no_grad():
        ours = model(ids, torch.arange(120).unsqueeze(0), None)
        theirs = hf(ids).logits
        assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
        # The control: without the YaRN block the logits differ, so the check has teeth.
        plain = tiny_smollm3(max_position_embeddings=128)
        init_checkpoint(plain, tmp_path / "plain")
        plain_model, _, _ = load_checkpoint_model(tmp_path / "plain")
        plain_model.load_state_dict(model.state_dict())
        moved = plain_model(ids, torch.arange(120).unsqueeze(0), None)
        assert ((moved - theirs).norm() / theirs.norm()).item() > 1e-4


def test_passkey_scores_only_generated_tokens(llama_tokenizer_dir):
    from megasmol.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(llama_tokenizer_dir)
    prompt = build_prompt(tokenizer, 512, 0.5, "48213")
    text = tokenizer.decode(prompt)
    assert abs(len(prompt) - 512) < 40 and NEEDLE.format(key="48213").strip() in text
    assert text.rstrip().endswith("The pass key is")  # the answer is not in the prompt's tail

    def reads_the_prompt(ids):  # a perfect retriever: it can only look at the prompt ids
        found = re.search(r"pass key is (\d+)", tokenizer.decode(ids[0].tolist()))
        return tokenizer(f" {found.group(1)}.", add_special_tokens=False).input_ids

    def guesses(ids):
        return tokenizer(" 12345.", add_special_tokens=False).input_ids

    lengths, depths = [256, 1024], [0.0, 0.5, 1.0]
    perfect = evaluate(reads_the_prompt, tokenizer, lengths, depths, trials=3)
    assert perfect.grid() == [[1.0] * 3] * 2 and perfect.overall == 1.0
    wrong = evaluate(guesses, tokenizer, lengths, depths, trials=3)
    assert wrong.overall == 0.0
    assert score(" 48213. Remember", "48213") and not score(" 4821", "48213")
    assert not score("", "48213") and not score(" 148213", "48213")


def test_passkey_cli_on_a_random_model_is_near_chance(tmp_path, llama_tokenizer_dir):
    assert cli_in_process("init", "--spec", "smollm3-tiny", "--out", str(tmp_path / "ckpt"),
                          "--tokenizer", str(llama_tokenizer_dir)).returncode == 0
    proc = cli_in_process("eval", "passkey", "--checkpoint", str(tmp_path / "ckpt"), "--lengths", "256,512",
                   "--depths", "0,0.5,1", "--trials", "2", "--out", str(tmp_path / "out"), "--quiet")
    report = json.loads((tmp_path / "out" / "passkey.json").read_text())
    assert report["overall"] == 0.0 and len(report["trials"]) == 12
    assert "overall: 0.0%" in proc.stdout
    assert (tmp_path / "out" / "passkey.png").stat().st_size > 1000
