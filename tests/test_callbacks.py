"""The training loop's parts, each driven without a training process: the callbacks' hooks
(OLMo-core's callback tests are the model), the step guard, the typed train state, the result's
loss windows and the checkpointer's rules and hooks. One in-process setup (a tiny model on random
data, TP=PP=1, gloo) serves the callbacks that need a model."""

import copy
import json
import math

import pytest
import torch

from megasmol.config.sections import SpikeConfig, WatchdogConfig
from megasmol.train.callbacks import Callback, Callbacks, Console, LoopContext
from megasmol.train.callbacks.downstream import DownstreamCallback
from megasmol.train.callbacks.hang import HangWatchdog
from megasmol.train.callbacks.heartbeats import NvrxHeartbeats
from megasmol.train.callbacks.metrics import MetricsCallback
from megasmol.train.callbacks.post_save import PostSaveCallback, PostSaveRunner
from megasmol.train.callbacks.progress import ProgressCallback
from megasmol.train.callbacks.throughput import ThroughputCallback
from megasmol.train.callbacks.validation import ValidationCallback
from megasmol.train.guard import StepGuard
from megasmol.train.metrics import MetricsLog
from megasmol.train.state import LOSS_WINDOW, TrainResult, TrainState
from tests.train_fixtures import write_training_run


class Sinks:
    """A ``MetricsLog`` writing metrics.jsonl in ``run_dir``, and the records it got."""

    def __init__(self, run_dir):
        self.log = MetricsLog(run_dir, active=True, jsonl=True, flops_per_token=1.0, world_size=1,
                              peak_tflops=None, nvml=False)
        self.path = run_dir / "metrics.jsonl"

    def records(self, kind=None):
        self.log.jsonl.flush()
        rows = [json.loads(line) for line in self.path.read_text().splitlines()]
        return [r for r in rows if kind is None or r["kind"] == kind]


def context(tmp_path, setup=None, total_steps=20):
    sinks = Sinks(tmp_path)
    state = TrainState(consumed_tokens=640)
    return LoopContext(setup, tmp_path, total_steps, sinks.log, Console(True), state), sinks


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A real ``TrainingSetup``: the tiny spec, two random datasets, validation batches."""
    from megasmol.config.run import load_run_config
    from megasmol.train.setup import build_setup
    from tests.conftest import ensure_megatron_runtime

    ensure_megatron_runtime()
    root = tmp_path_factory.mktemp("setup")
    config = load_run_config(write_training_run(root, steps=6, checkpoint={"interval": 2, "keep_last": 2}))
    return build_setup(config)


def test_hooks_run_in_the_given_order_and_close_in_reverse_even_after_a_failure():
    calls = []

    class Recorder(Callback):
        def __init__(self, name, fail_close=False):
            self.name, self.fail_close = name, fail_close

        def on_step_end(self, step):
            calls.append(("end", self.name, step))

        def close(self, stopped_by_signal=False, peers_lost=False):
            calls.append(("close", self.name, peers_lost))
            if self.fail_close:
                raise OSError(f"{self.name} could not close")

    hooks = Callbacks([Recorder("late"), Recorder("b", fail_close=True), Recorder("a")])
    hooks.on_step_end(3)
    assert [c[1] for c in calls] == ["late", "b", "a"]  # the list's order: the same on every rank
    with pytest.raises(OSError, match="b could not close"):
        hooks.close(peers_lost=True)
    assert calls[3:] == [("close", "a", True), ("close", "b", True), ("close", "late", True)]
    assert hooks["b"].fail_close
    with pytest.raises(ValueError, match="share a name"):
        Callbacks([Recorder("x"), Recorder("x")])


def test_the_metrics_callback_writes_each_interval_record_and_its_line(tmp_path, capsys):
    ctx, sinks = context(tmp_path)
    metrics = MetricsCallback(ctx)
    record = {"step": 5, "stage": "stable", "lr": 1e-3, "loss": 2.5, "grad_norm": 0.75, "tokens": 640,
              "tokens_per_s": 3200.0, "tokens_per_s_per_device": 3200.0, "step_time_s": 0.2,
              "memory_gb": 1.0, "skipped_steps": 0, "nan_steps": 0, "spikes": 0, "eta_s": 3.0}
    metrics.on_log(record, 5)
    (written,) = sinks.records("train")
    assert written["step"] == 5 and written["loss"] == 2.5 and "time" in written
    line = capsys.readouterr().out
    assert "step  5/20 | stable | loss 2.5000 | grad 0.750" in line and "eta 0m03s" in line
    metrics.close()
    assert sinks.log.jsonl.closed


def test_the_progress_bar_counts_steps_carries_the_console_and_closes_on_a_rollback(
        tmp_path, monkeypatch, capsys):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    ctx, _ = context(tmp_path)
    monkeypatch.setattr(sys, "stderr", Terminal())
    progress = ProgressCallback(ctx, enabled=True)
    progress.on_train_start(4)  # resumed after step 4
    assert progress.bar.n == 4 and progress.bar.total == 20 and ctx.console.progress is progress.bar
    progress.on_step_end(5)
    ctx.console.print("saved checkpoint x")  # through the bar, not over it
    assert progress.bar.n == 5 and "saved checkpoint x" in capsys.readouterr().out
    progress.on_rollback(5)
    assert progress.bar is None and ctx.console.progress is None
    progress.on_train_start(2)  # the redone steps get a new bar
    assert progress.bar.n == 2
    progress.close()
    assert ctx.console.progress is None
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no terminal: log lines carry the ETA
    quiet = ProgressCallback(ctx, enabled=True)
    quiet.on_train_start(0)
    assert quiet.bar is None and ctx.console.progress is None


def test_the_throughput_callback_warns_once_with_the_slowest_gpu(tmp_path, capsys):
    ctx, sinks = context(tmp_path)

    class Logging:
        expected_tokens_per_s_per_gpu, throughput_fraction, throughput_window = 1000.0, 0.9, 20

    class Gpu:  # what NvmlSampler.sample gives on a throttling GPU
        def sample(self):
            return {"gpu_sm_clock_mhz": 1100, "gpu_throttle_reasons": 0x40}

    watch = ThroughputCallback(ctx, Logging(), Gpu())
    for step, tps in ((10, 950), (20, 600), (30, 600), (40, 600)):
        watch.on_log({"step": step, "tokens_per_s_per_device": float(tps)}, 10)
    (warning,) = sinks.records("throughput_warning")
    assert warning["step"] == 30 and warning["below_since_step"] == 11
    assert warning["slowest_throttle_reasons"] == ["hw_thermal_slowdown"]
    assert "WARNING throughput 600 tokens/s per device since step 11" in capsys.readouterr().out


def test_the_hang_watchdog_times_steps_between_the_hooks_and_forgets_an_abandoned_one(tmp_path):
    now = [100.0]
    watchdog = HangWatchdog(WatchdogConfig(min_s=60.0), tmp_path, rank=0, clock=lambda: now[0])
    watchdog.on_train_start(0)
    assert watchdog._thread is not None and watchdog._thread.is_alive()
    for step in (1, 2, 3):
        watchdog.on_step_start(step)
        now[0] += 10.0
        watchdog.on_step_end(step)
    assert list(watchdog.times) == [10.0, 10.0, 10.0] and watchdog.deadline_s() == 100.0
    watchdog.on_step_start(4)
    now[0] += 500.0
    assert watchdog.overdue() == 500.0  # the thread would fire now
    watchdog.on_rollback(4)
    assert watchdog.overdue() is None  # a rollback's abandoned step is no hang
    watchdog.close()
    assert not watchdog._thread.is_alive()


def test_heartbeats_beat_once_per_step_end_and_close(monkeypatch):
    class Client:  # NVRx's RankMonitorClient is not installed on CPU machines
        beats, closed = 0, False

        def send_heartbeat(self):
            self.beats += 1

        def shutdown_workload_monitoring(self):
            self.closed = True

    from megasmol.config.typed import ConfigError

    monkeypatch.delenv("FT_RANK_MONITOR_IPC_SOCKET", raising=False)
    with pytest.raises(ConfigError, match="start the job with ft_launcher"):
        NvrxHeartbeats(enabled=True)
    hook = NvrxHeartbeats(enabled=False)
    hook.on_step_end(1)  # off: nothing to beat
    hook.client = client = Client()
    for step in (1, 2):
        hook.on_step_start(step)
        hook.on_step_end(step)
    hook.close()
    assert client.beats == 2 and client.closed and hook.client is None


def test_post_save_runs_the_command_on_committed_checkpoints_only(tmp_path):
    done = []
    runner = PostSaveRunner(f"echo {{step}} >> {tmp_path}/uploaded", 30.0, on_success=done.append)
    hook = PostSaveCallback(runner, grace_s=20.0)
    (tmp_path / "iter_0000004").mkdir()
    hook.on_checkpoint(4, "interval")  # not yet complete: nothing runs
    hook.on_checkpoint_committed(tmp_path / "iter_0000004", 4)
    hook.close(stopped_by_signal=True)
    assert (tmp_path / "uploaded").read_text().split() == ["4"]
    assert done == [tmp_path / "iter_0000004"]
    PostSaveCallback(None, 20.0).on_checkpoint_committed(tmp_path, 4)  # ranks other than 0: no runner


def test_downstream_scores_at_its_interval_at_checkpoints_and_never_twice_or_on_a_signal(tmp_path):
    class Evaluation:  # InLoopEvaluation's interface; its scoring is test_eval_in_loop's subject
        interval, at_checkpoint = 4, True
        scored = []

        def run(self, setup):
            self.scored.append(len(self.scored))
            return [0.5]

        def write(self, step, results, run_dir):
            (run_dir / f"iter_{step}").mkdir()

        def record(self, step, results):
            return {"step": step, "demo/acc": results[0]}

        def line(self, step, results):
            return f"downstream at step {step}"

    class Setup:
        is_logging_rank = True

    ctx, sinks = context(tmp_path, Setup(), total_steps=10)
    hook = DownstreamCallback(ctx, Evaluation())
    for step in range(1, 11):
        hook.on_step_done(step)
        if step in (4, 6):
            hook.on_checkpoint(step, "interval")
        if step == 7:
            hook.on_checkpoint(step, "signal")  # a preemption's grace is for saving
    hook.on_checkpoint(10, "end")  # already scored at the last step
    records = sinks.records("downstream")
    assert [r["step"] for r in records] == [4, 6, 8, 10]
    assert records[0]["consumed_tokens"] == 640 and (tmp_path / "iter_6").is_dir()
    stopped = DownstreamCallback(ctx, Evaluation())  # a run ending at training.stop_after_step=3
    for step in (1, 2, 3):
        stopped.on_step_done(step)
    stopped.on_checkpoint(3, "end")
    assert [r["step"] for r in sinks.records("downstream")][-1] == 3


def test_validation_runs_when_due_on_the_real_model_and_leaves_it_training(tiny_setup, tmp_path, capsys):
    ctx, sinks = context(tmp_path, tiny_setup, total_steps=6)
    hook = ValidationCallback(ctx, interval=3, steps=1)
    weights = [p.detach().clone() for p in tiny_setup.model.parameters()]
    for step in (1, 2, 3):
        hook.on_step_done(step)
    (record,) = sinks.records("validation")
    assert record["step"] == 3 and record["tokens"] > 0 and math.isfinite(record["loss"])
    assert record["perplexity"] == pytest.approx(math.exp(record["loss"]))
    assert abs(record["loss"] - math.log(512)) < 1.0  # an untrained model over a 512-token vocabulary
    hook.validate(3)
    assert hook.losses[3] == record["loss"]  # the same held-out batches: the same loss
    assert tiny_setup.ddp_model.training
    assert all(torch.equal(a, b) for a, b in zip(weights, tiny_setup.model.parameters()))
    assert "validation at step 3: loss" in capsys.readouterr().out


def test_the_checkpointer_saves_once_per_step_fires_its_hooks_in_order_and_prunes(tiny_setup, tmp_path):
    from megasmol.train.checkpointing import Checkpointer

    class Hooks:
        events = []

        def on_checkpoint(self, step, reason):
            self.events.append(("checkpoint", step, reason, (tmp_path / "ck" / "latest").exists()))

        def on_checkpoint_committed(self, path, step):
            self.events.append(("committed", step, path.name))

    from megasmol.train.step import train_step

    assert train_step(tiny_setup, 1, tiny_setup.batches.micro_batches(1), 1e-3).applied  # optimizer state
    config = copy.deepcopy(tiny_setup.config)
    config.checkpoint.dir = str(tmp_path / "ck")
    saver = Checkpointer(config, tiny_setup, Console(True), None)
    saver.hooks = Hooks()
    metadata = {"model_spec": tiny_setup.spec.to_dict(), "params_dtype": "float32",
                "run_config": config.to_dict(), "train_state": TrainState(step=2).to_json(
                    spike_window=[], lr=None, weights_finite=True, branch=None)}
    assert saver.due(2) and not saver.due(3)
    first = saver.save(2, lambda: metadata, "interval")
    stamp = (first / "megasmol.json").stat().st_mtime_ns
    assert saver.save(2, lambda: metadata, "end") == first  # already the latest: not rewritten
    assert (first / "megasmol.json").stat().st_mtime_ns == stamp
    for step in (4, 6):
        saver.save(step, lambda: metadata, "interval")
    assert Hooks.events == [("checkpoint", 2, "interval", False), ("committed", 2, "iter_0000002"),
                            ("checkpoint", 4, "interval", True), ("committed", 4, "iter_0000004"),
                            ("checkpoint", 6, "interval", True), ("committed", 6, "iter_0000006")]
    assert sorted(p.name for p in (tmp_path / "ck").glob("iter_*")) == ["iter_0000004", "iter_0000006"]
    assert saver.latest().name == "iter_0000006"
    assert saver.restore(saver.latest())["train_state"]["step"] == 2  # the metadata as written
    saver.close()


def test_the_step_applies_the_update_unless_its_guard_says_otherwise(tiny_setup):
    """One step as the loop and the pre-flight run it: an inf gradient planted through the fault
    plan's seam reaches every rank's flag, and the guard's skip leaves the weights untouched."""
    from megasmol.train.step import train_step
    from megasmol.utils.faults import FaultPlan

    class InfGradient(FaultPlan):
        def after_backward(self, step, ddp_model):
            ddp_model.buffers[0].grad_data[0] = float("inf")

    micro = tiny_setup.batches.micro_batches(2)
    before = [p.detach().clone() for p in tiny_setup.model.parameters()]
    guard = StepGuard(SpikeConfig(max_nonfinite_steps=3))
    skipped = train_step(tiny_setup, 2, micro, 1e-3, guard=guard, faults=InfGradient())
    assert skipped.totals.nonfinite_grads and not skipped.applied
    assert (skipped.decision.action, skipped.decision.nonfinite) == ("skip", "gradient")
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_setup.model.parameters()))
    applied = train_step(tiny_setup, 2, micro, 1e-3, guard=guard, stop=True)
    assert applied.applied and math.isfinite(applied.grad_norm) and applied.totals.stop
    assert applied.totals.loss == pytest.approx(skipped.totals.loss)  # the same batch, same weights
    assert applied.totals.tokens == sum(int(mb["loss_mask"].sum()) for mb in micro)
    assert not all(torch.equal(a, b) for a, b in zip(before, tiny_setup.model.parameters()))


def test_the_step_guard_applies_skips_rolls_back_and_declares_divergence():
    config = SpikeConfig(policy="skip", window=10, warmup_steps=3, threshold=3.0, max_nonfinite_steps=2)
    guard = StepGuard(config)
    actions = [guard.decide(s, loss, False).action for s, loss in enumerate([2.0, 2.1, 1.9, 2.0], 1)]
    spike = guard.decide(5, 9.0, False)
    assert actions == ["apply"] * 4 and spike.action == "skip" and spike.spike.mean == pytest.approx(2.0)
    assert guard.state_dict()["spike_window"] == [2.0, 2.1, 1.9, 2.0]  # a spike does not enter it
    first = guard.decide(6, 2.0, True)
    assert (first.action, first.nonfinite, first.in_a_row) == ("skip", "gradient", 1)
    assert guard.decide(7, 2.0, False).action == "apply"  # the streak ends
    guard.decide(8, float("nan"), False)
    diverged = guard.decide(9, float("inf"), False)
    assert (diverged.action, diverged.nonfinite, diverged.in_a_row) == ("diverged", "loss", 2)
    rollback = StepGuard(SpikeConfig(policy="rollback"), [2.0] * 30)
    assert rollback.decide(31, float("nan"), False).action == "rollback"
    assert StepGuard(SpikeConfig(policy="log"), [2.0, 2.2] * 15).decide(31, 50.0, False).action == "apply"
    resumed = StepGuard(config)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.decide(10, 9.0, False).action == guard.decide(10, 9.0, False).action == "skip"


def test_the_train_state_keeps_the_checkpoint_keys_and_reads_old_checkpoints():
    state = TrainState(step=12, consumed_tokens=3072, skip_batches=[[3, 4]])
    saved = state.to_json(spike_window=[2.0, 1.5], lr=1e-3, weights_finite=True, branch=None)
    # The keys every checkpoint since the first train_state was written with (resume reads them).
    assert set(saved) == {"step", "spike_window", "skip_batches", "weights_finite", "lr",
                          "consumed_tokens", "branch"}
    back = TrainState.from_json(json.loads(json.dumps(saved)), skip_batches=[[9, 9]],
                                tokens_through=lambda step: -1)
    assert (back.step, back.consumed_tokens, back.skip_batches) == (12, 3072, [[9, 9], [3, 4]])
    assert back.skipped(4) and back.skipped(9) and not back.skipped(5)
    old = TrainState.from_json({"step": 5}, skip_batches=[], tokens_through=lambda step: step * 256)
    assert old.consumed_tokens == 1280  # a checkpoint from before consumed_tokens was recorded


def test_the_result_keeps_bounded_loss_windows_and_forgets_steps_a_rollback_redoes():
    result = TrainResult()
    assert not result.trained
    for step in range(1, 1001):
        result.record_loss(step, float(step))
    assert len(result.first_losses) == len(result.last_losses) == LOSS_WINDOW
    assert result.first_and_last_loss() == (5.5, 995.5)
    assert result.first_and_last_loss(2) == (1.5, 999.5)
    short = TrainResult()
    for step in range(1, 11):  # ten steps: the first five against the last five, not all against all
        short.record_loss(step, float(step))
    assert short.first_and_last_loss() == (3.0, 8.0)
    result.record_loss(996, 0.0)  # rolled back to 995, redone
    assert max(result.last_losses) == 996 and result.last_losses[996] == 0.0


def test_one_function_builds_the_same_ordered_list_from_the_config(tiny_setup, tmp_path):
    from megasmol.train.callbacks import build_callbacks

    config = copy.deepcopy(tiny_setup.config)
    ctx, _ = context(tmp_path, tiny_setup)
    names = [c.name for c in build_callbacks(ctx, config, tokenizer_dir=None)]
    assert names == ["metrics", "progress", "throughput", "hang_watchdog", "nvrx_heartbeats",
                     "validation", "post_save"]
    config.checkpoint.post_save_command = "true {path}"
    hooks = build_callbacks(ctx, config, tokenizer_dir=None, prune_uploaded=print)
    assert hooks["post_save"].runner is not None and hooks["validation"].interval == config.eval.interval
    hooks["post_save"].close()


def test_eval_config_refuses_a_task_limit_below_one():
    """``eval.tasks_limit`` 0 (or less) would score no example: refused, naming the field."""
    from megasmol.config.sections import EvalConfig
    from megasmol.config.typed import ConfigError

    EvalConfig(tasks=["copa"], tasks_interval=10, tasks_limit=None).validate()
    with pytest.raises(ConfigError, match="eval.tasks_limit"):
        EvalConfig(tasks=["copa"], tasks_interval=10, tasks_limit=0).validate()
