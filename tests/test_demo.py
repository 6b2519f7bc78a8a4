"""`megasmol demo`, shortened: corpus, tokenize, train, plot, export, sample, compare."""

from tests.conftest import run_cli


def test_short_demo_trains_exports_and_agrees_with_transformers(tmp_path):
    proc = run_cli("demo", "--workdir", str(tmp_path), "--steps", "30",
                   "--set", "schedule.warmup_steps=10", "--set", "eval.interval=15",
                   "--set", "checkpoint.interval=15", "--set", "eval.tasks_limit=20",
                   "--set", "eval.tasks=[demo_word_order]")
    out = proc.stdout
    assert "[1/5] demo corpus built and tokenized" in out
    assert "the loss fell clearly" in out  # the demo's own check: last 10 steps 2 nats lower
    assert out.count("Megatron-Core greedy decoding gives the same tokens: True") == 2
    assert (tmp_path / "loss.png").stat().st_size > 5000
    assert (tmp_path / "hf" / "config.json").is_file()
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "iter_0000030"
    assert "downstream at step 15: demo_word_order acc" in out  # in the loop, at each checkpoint
    assert "[5/5] downstream tasks" in out and "random init" in out and "trained vs chance" in out
