"""RL with verifiable rewards end to end: ``megasmol train`` with ``training.objective: rl`` on the
tiny spec (tests/rl_fixtures.py): completions sampled by the model being trained, a user's reward
function, GRPO's loss; exactly on-policy, learning, resume bit for bit, parallel layouts."""

import json
import math

import pytest

from tests.rl_fixtures import write_eval_suite, write_rl_run
from tests.train_fixtures import step_losses, torchrun_train, train

TRL_NAMES = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
             "completions/clipped_ratio", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "rewards/even_tokens/mean", "rewards/even_tokens/std", "entropy")


def _records(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    """Ten steps from a saved initialization (random initialization differs by layout; the
    layout tests start from the same one), with an in-loop evaluation suite every 5 steps; every
    checkpoint kept (3, 6, 9, 10: the resume test starts from step 3's)."""
    root = tmp_path_factory.mktemp("rl")
    suite = write_eval_suite(root / "tasks")
    config = write_rl_run(root, steps=10, initialized=True, checkpoint={"keep_last": 0},
                          eval={"tasks": [str(suite)], "tasks_interval": 5, "tasks_limit": None})
    proc = train(config)
    return config, proc


def test_the_reward_rises_and_every_step_is_exactly_on_policy(rl_run):
    config, proc = rl_run
    records = _records(config.parent / "run")
    assert [r["step"] for r in records] == list(range(1, 11))
    for record in records:
        for name in TRL_NAMES:
            assert name in record, name
        # the trainer's log-probs of the sampled tokens are the decoder's (fp32 on CPU)
        assert record["logps/rollout_max_diff"] <= 1e-5
        # NeMo-RL's mean exp|rollout - trainer| over the trained tokens: 1 to float rounding
        assert 1.0 <= record["token_mult_prob_error"] <= math.exp(record["logps/rollout_max_diff"]) + 1e-12
        assert 0 < record["time/generation_share"] < 1
        assert 0 < record["entropy"] < math.log(512)  # nats over the 512-token vocabulary
    rewards = [r["reward"] for r in records]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    assert "reward" in proc.stdout and "on-policy" in proc.stdout and "entropy" in proc.stdout
    # the policy sharpens as it learns (the sampled entropy falls)
    assert records[-1]["entropy"] < records[0]["entropy"], [r["entropy"] for r in records]


def _resumed_rl_run(source_run, iteration: str, root, rollouts: bool = False, **sections):
    """An RL run under ``root`` (``write_rl_run(root, **sections)``) whose checkpoint directory
    holds ``source_run``'s checkpoint ``iteration`` as its latest: training it resumes there (one
    process, instead of a run stopped and restarted). ``rollouts``: also the source's saved
    rollout batch (``run/rollouts``, the last one sampled), as a run stopped there leaves it."""
    import shutil

    config = write_rl_run(root, **sections)
    checkpoints = root / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    shutil.copytree(source_run / "checkpoints" / iteration, checkpoints / iteration)
    (checkpoints / "latest").write_text(f"{iteration}\n")
    if rollouts:
        shutil.copytree(source_run / "rollouts", root / "run" / "rollouts")
    return config


def test_a_resumed_run_samples_and_trains_exactly_as_an_uninterrupted_one(rl_run, tmp_path):
    """Resumed from the fixture's step-3 checkpoint without in-loop evaluation: steps 4-10 sample
    and train as the uninterrupted run's, whose evaluation at step 5 changed nothing."""
    config, _ = rl_run
    whole = step_losses(config.parent / "run")
    rewards = step_losses(config.parent / "run", "reward")
    again = _resumed_rl_run(config.parent / "run", "iter_0000003", tmp_path / "again", steps=10)
    assert "resumed from" in train(again).stdout
    assert step_losses(tmp_path / "again" / "run") == {s: whole[s] for s in range(4, 11)}
    assert step_losses(tmp_path / "again" / "run", "reward") == {s: rewards[s] for s in range(4, 11)}


def test_several_updates_per_rollout_batch_resume_in_the_middle_of_one(tmp_path):
    sets = ("rl.num_iterations=2", "checkpoint.interval=1")
    first = write_rl_run(tmp_path / "whole", steps=4)
    train(first, *sets)
    # Step 3 sampled a batch step 4 reuses: resumed from step 3's checkpoint (kept: keep_last 2)
    # with that batch on disk (the whole run's last sampled), step 4 trains on it again.
    second = _resumed_rl_run(tmp_path / "whole" / "run", "iter_0000003", tmp_path / "split",
                             rollouts=True, steps=4)
    assert "resumed from" in train(second, *sets).stdout
    whole, split = _records(tmp_path / "whole" / "run"), _records(tmp_path / "split" / "run")
    assert [r["loss"] for r in whole][3:] == [r["loss"] for r in split] and len(split) == 1
    # the second update of a batch is off-policy: its importance weights differ from 1
    assert whole[1]["reward"] == whole[0]["reward"] and "logps/rollout_max_diff" not in whole[1]
    assert "logps/rollout_max_diff" in whole[2]
    assert "token_mult_prob_error" not in whole[1] and "token_mult_prob_error" in whole[2]
    # the decoder's entropies are the policy's only for the weights that sampled the batch
    assert "entropy" not in whole[1] and "entropy" in whole[2]


@pytest.mark.parametrize("layout", [("parallel.tensor_parallel=2",), ("parallel.pipeline_parallel=2",),
                                    ("parallel.context_parallel=2",), ()], ids=["tp2", "pp2", "cp2", "dp2"])
def test_parallel_layouts_sample_and_train_as_one_process(rl_run, tmp_path, layout):
    config, _ = rl_run
    one = _records(config.parent / "run")[:2]
    parallel = write_rl_run(tmp_path / "p", steps=10)
    torchrun_train(parallel, *layout, "training.stop_after_step=2",
                   f"checkpoint.init_from={config.parent / 'init'}")
    two = _records(tmp_path / "p" / "run")
    for a, b in zip(one, two):
        assert b["reward"] == pytest.approx(a["reward"], abs=1e-6)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["logps/rollout_max_diff"] <= 1e-5


def test_dynamic_sampling_refills_groups_without_signal_and_flat_rewards_are_said(tmp_path):
    mixed = write_rl_run(tmp_path / "mixed", steps=3, rl={"num_generations": 4, "dynamic_sampling": True,
                                                         "max_refills": 3},
                         rewards={"functions": [{"name": "tests.rl_rewards:even_tokens_on_even_prompts"}]})
    train(mixed)
    records = _records(tmp_path / "mixed" / "run")
    assert any(r["dynamic_sampling/rounds"] > 1 for r in records)
    flat = write_rl_run(tmp_path / "flat", steps=5, rl={"dynamic_sampling": True, "max_refills": 1},
                        rewards={"functions": [{"name": "tests.rl_rewards:prompt_parity"}]})
    proc = train(flat)
    assert "dynamic sampling found 0 of 4 groups with different rewards after 1 refills" in proc.stdout
    assert "steps 1-5: every group's completions got equal rewards" in proc.stdout
    assert all(r["frac_reward_zero_std"] == 1.0 for r in _records(tmp_path / "flat" / "run"))


@pytest.mark.parametrize("sets, message", [
    (("training.global_batch_size=10",), "training.global_batch_size (10) counts completions per step "
                                         "and must be a multiple of rl.num_generations (4)"),
    (("rl.beta=0.04",), "rl.beta > 0 needs a reference model: set checkpoint.init_from"),
    (("rl.num_generations=1",), "rl.num_generations must be >= 2"),
    (("parallel.context_parallel=2", "rl.num_iterations=2"),
     "rl.num_iterations > 1 does not run under parallel.context_parallel > 1 yet"),
], ids=["batch", "beta", "group", "cp"])
def test_bad_rl_settings_are_refused_before_anything_runs(tmp_path, sets, message):
    from megasmol.config.run import load_run_config
    from megasmol.config.typed import ConfigError
    from megasmol.train.objectives import objective_kind

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config = load_run_config(write_rl_run(tmp_path, steps=2), list(sets))
        objective_kind(config.objective).check(config, True)


def test_completions_longer_than_a_row_are_one_line_naming_the_field(tmp_path):
    proc = train(write_rl_run(tmp_path, steps=2), "rl.max_completion_length=30", check=False)
    assert proc.returncode != 0 and "rl.max_completion_length (30) plus the longest prompt" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_in_loop_evaluation_suite_runs_at_its_interval_during_rl(rl_run):
    """``eval.tasks`` during RL, as during pretraining: the suite scored by the policy being
    trained at steps 5 and 10, its records in metrics.jsonl and its reports under downstream/."""
    config, proc = rl_run
    run = config.parent / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    downstream = {r["step"]: r for r in records if r["kind"] == "downstream"}
    assert sorted(downstream) == [5, 10]
    for step, record in downstream.items():
        assert 0 <= record["cloze/acc"] <= 1 and record["cloze/gold_loglik"] < 0
        assert record["words/average"] == pytest.approx((record["cloze/acc"] + record["gen/exact_match"]) / 2)
        report = json.loads((run / "downstream" / f"iter_{step:07d}" / "results.json").read_text())
        assert report["settings"]["tasks"] == ["cloze", "gen"]
        assert (run / "downstream" / f"iter_{step:07d}" / "samples.jsonl").stat().st_size > 0
        assert f"downstream at step {step}: cloze acc" in proc.stdout
    # the policy changed between the two: the gold answers' log-likelihood moved
    assert downstream[5]["cloze/gold_loglik"] != downstream[10]["cloze/gold_loglik"]
