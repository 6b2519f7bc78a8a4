"""Expected throughput: a sustained drop is one warning per episode, with the slowest GPU. (The
callback that writes the warning, and its place in every run's callbacks: tests/test_callbacks.py.)"""

from megasmol.train.callbacks.throughput import ThroughputWatch, throttle_names


def test_a_sustained_drop_warns_once_per_episode():
    watch = ThroughputWatch(expected=1000.0, fraction=0.9, window=30)
    verdicts = {}
    for step, tps in ((10, 950), (20, 850), (30, 800), (40, 820), (50, 830), (60, 950), (70, 700),
                      (80, 700), (90, 700), (100, 700)):
        verdicts[step] = watch.observe(step, 10, tps)
    # Slow from step 11: 30 steps are slow at step 40, the warning comes once; recovery at 60
    # re-arms it; slow again from 61, 30 steps at 90.
    assert [s for s, warn in verdicts.items() if warn] == [40, 90]
    record = watch.check(110, {"tokens_per_s_per_device": 600.0}, 10,
                         lambda: {"gpu_sm_clock_mhz": 1200, "gpu_throttle_reasons": 0x48})
    assert record is None  # the same episode: no second warning
    again = ThroughputWatch(expected=1000.0, fraction=0.9, window=10)
    record = again.check(10, {"tokens_per_s_per_device": 600.0}, 10,
                         lambda: {"gpu_sm_clock_mhz": 1200, "gpu_throttle_reasons": 0x48})
    assert record["slowest_rank"] == 0 and record["slowest_throttle_reasons"] == [
        "hw_slowdown", "hw_thermal_slowdown"]
    assert "hw_thermal_slowdown" in ThroughputWatch.line(record)
    assert throttle_names(0x1 | 0x2) == []  # idle and application clocks are not slowdowns
    assert ThroughputWatch(expected=None, fraction=0.9, window=1).observe(10, 10, 1.0) is False

