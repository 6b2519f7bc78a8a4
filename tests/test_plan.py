"""Planning tools against hand-computed numbers."""

import math

import pytest

from megasmol.plan.compute import size_cluster, training_flops
from megasmol.plan.fertility import fallback_words, fertility_table
from megasmol.plan.hparams import deepseek_batch_tokens, deepseek_lr, sqrt_lr_scaling
from tests.conftest import run_cli


def test_playbook_cluster_sizing():
    sizing = size_cluster(3e9, 11e12, 720, 0.30, days=28)
    assert training_flops(3e9, 11e12) == 1.98e23
    assert math.ceil(sizing.gpus) == 379 and sizing.gpus == pytest.approx(378.9, abs=0.1)
    assert sizing.tokens_per_second_per_gpu == pytest.approx(12_000)  # 216e12 / 18e9
    reverse = size_cluster(3e9, 11e12, 720, 0.30, gpus=384)
    assert reverse.days == pytest.approx(28 * 378.9 / 384, rel=1e-3)
    out = run_cli("plan", "compute", "--params", "3B", "--tokens", "11T", "--peak-tflops", "720",
                  "--mfu", "0.3", "--weeks", "4").stdout
    assert "round up to 379" in out
    with pytest.raises(ValueError, match="exactly one"):
        size_cluster(3e9, 11e12, 720, 0.3)


@pytest.mark.parametrize("flops,lr,batch", [
    # By hand: 0.3118 * 10^(-0.125 * 20) = 0.3118 * 10^-2.5; 0.2920 * 10^(0.3271 * 20 = 6.542)
    (1e20, 0.3118 * 0.0031623, 0.2920 * 3.4834e6),
    # 0.3118 * 10^-2.75; 0.2920 * 10^7.196
    (1e22, 0.3118 * 0.0017783, 0.2920 * 1.5704e7),
    # SmolLM3-sized: C = 6 * 3e9 * 11e12 = 1.98e23: 10^(-0.125 * 23.2967) = 10^-2.9121
    (1.98e23, 0.3118 * 0.0012242, 0.2920 * 10 ** (0.3271 * 23.2967)),
])
def test_deepseek_fits(flops, lr, batch):
    assert deepseek_lr(flops) == pytest.approx(lr, rel=1e-3)
    assert deepseek_batch_tokens(flops) == pytest.approx(batch, rel=1e-3)


def test_sqrt_lr_rule_and_cli_caveat():
    assert sqrt_lr_scaling(3e-4, 4, 16) == pytest.approx(6e-4)
    assert sqrt_lr_scaling(3e-4, 16, 4) == pytest.approx(1.5e-4)
    out = run_cli("plan", "hparams", "--flops", "1e21", "--seq-length", "4096").stdout
    assert "critical batch size" in out and "7.394e-04" in out


def _char_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyz,!'")}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(tmp_path / "chars")
    return fast


def test_fertility_known_answers(tmp_path):
    chars = _char_tokenizer(tmp_path)
    assert fallback_words("it's a bb, ccc!") == ["it's", "a", "bb", ",", "ccc", "!"]
    splitter = {"en": (fallback_words, "regex fallback")}
    [row] = fertility_table({"chars": chars}, {"en": "a bb ccc"}, splitter)
    assert (row.words, row.tokens, row.continued) == (3, 6, 2)
    assert row.fertility == 2.0 and row.continued_share == pytest.approx(2 / 3)
    (tmp_path / "en.txt").write_text("a bb, ccc!")
    out = run_cli("plan", "fertility", "--tokenizer", f"chars={tmp_path / 'chars'}", "--text",
                  f"en={tmp_path / 'en.txt'}", "--csv", str(tmp_path / "f.csv")).stdout
    # words a, bb, ",", ccc, "!" -> tokens 1+2+1+3+1 = 8 over 5 words; 2 continued
    assert "1.600" in out and "40.0%" in out
    assert (tmp_path / "f.csv").read_text().splitlines()[1].startswith("chars,en,5,8,1.600000,0.400000")


def test_layout_helper_finds_the_published_layout_and_refuses_impossible_memory():
    from megasmol.model.spec import load_model_spec
    from megasmol.plan.layout import fitting_layouts

    spec = load_model_spec("smollm3-3b")
    options = fitting_layouts(spec, gpus=384, global_batch=576, seq_length=4096, memory_gb=80,
                              distributed_optimizer=False)
    labels = [o.label() for o in options]
    assert "TP2 PP1 CP1 DP192 mbs 3 x 1" in labels  # SmolLM3's layout fits
    assert all(o.memory_gb <= 72 for o in options)
    assert options == sorted(options, key=lambda o: (-o.efficiency, o.memory_gb))
    assert not fitting_layouts(spec, gpus=8, global_batch=8, seq_length=4096, memory_gb=10)
    proc = run_cli("plan", "layout", "--spec", "smollm3-3b", "--gpus", "8", "--global-batch", "8",
                   "--memory-gb", "10", check=False)
    assert proc.returncode == 1 and "no layout fits" in proc.stdout
