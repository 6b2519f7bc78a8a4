"""In-process restart (``resilience:``, NVRx's ``inprocess.Wrapper``): the config refuses what NVRx
would refuse, naming the fields; under torchrun, a rank that raises mid-run is healed in the same
processes and the run goes on exactly as a run resumed from the same checkpoint."""

import pytest

from megasmol.config.run import load_run_config
from megasmol.config.typed import ConfigError

BASE = ("model: smollm3-tiny\ndata: {recipe: demo}\n"
        "training: {train_steps: 10, global_batch_size: 1, collective_timeout_s: 20}\n"
        "schedule: {warmup_steps: 1}\nresilience: {in_process_restart: true}\n")


def _load(tmp_path, *sets):
    path = tmp_path / "run.yaml"
    path.write_text(BASE)
    return load_run_config(path, list(sets))


def test_the_defaults_load_and_in_process_restart_is_off_by_default(tmp_path):
    config = _load(tmp_path)
    assert config.resilience.in_process_restart
    path = tmp_path / "plain.yaml"
    path.write_text(BASE.replace("resilience: {in_process_restart: true}\n", ""))
    assert not load_run_config(path, ["training.collective_timeout_s=600"]).resilience.in_process_restart


@pytest.mark.parametrize("sets, named", [
    (["resilience.soft_timeout_s=100"], "soft_timeout_s < hard_timeout_s < barrier_timeout_s"),
    (["resilience.hard_timeout_s=200"], "soft_timeout_s < hard_timeout_s < barrier_timeout_s"),
    (["resilience.heartbeat_interval_s=40"], "resilience.heartbeat_interval_s"),
    (["resilience.heartbeat_timeout_s=130"], "resilience.heartbeat_timeout_s"),
    (["resilience.soft_timeout_s=0.5"], "resilience.soft_timeout_s must be > 1"),
    (["resilience.max_restarts=-1"], "resilience.max_restarts"),
    (["resilience.store_port=70000"], "resilience.store_port"),
    (["training.collective_timeout_s=60"],
     "training.collective_timeout_s=60 must be below resilience.soft_timeout_s=60"),
    (["watchdog.min_s=90"], "watchdog.min_s=90 must be above resilience.hard_timeout_s=90"),
])
def test_nvrx_timeout_constraints_are_checked_at_load_time(tmp_path, sets, named):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, *sets)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_the_cross_section_checks_apply_only_with_in_process_restart(tmp_path):
    config = _load(tmp_path, "resilience.in_process_restart=false", "training.collective_timeout_s=600",
                   "watchdog.min_s=5")
    assert config.training.collective_timeout_s == 600


# ----- under torchrun: 2 gloo ranks, the 4-layer test model ------------------------------------

STEPS = 12
FAST = {"in_process_restart": True, "soft_timeout_s": 25, "hard_timeout_s": 35,
        "heartbeat_timeout_s": 20, "barrier_timeout_s": 90}
"""Short timeouts: on gloo the healthy rank learns of the fault when its collective with the failed
rank times out (``training.collective_timeout_s``, below the soft timeout)."""


def _run(root, resilience, env_extra=None, check=True):
    from tests.conftest import run_torchrun
    from tests.train_fixtures import write_training_run

    config = write_training_run(root, steps=STEPS, checkpoint={"interval": 3, "keep_last": 0},
                                training={"collective_timeout_s": 15}, resilience=resilience)
    args = ["-m", "megasmol", "train", "--config", str(config)]
    if check:
        return run_torchrun(args, env_extra=env_extra)
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, free_port
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.mark.serial
@pytest.mark.xfail(strict=False, reason="issue 39, open: on main at b12ad2d the healed run recovers (one "
                   "restart line) but its line lacks the fault's text and a later gloo recv times out "
                   "(15 s) with a bad file descriptor; it passed on the nvrx branch before the merge")
def test_an_exception_on_rank_1_is_healed_in_process_with_the_losses_of_a_resumed_run(tmp_path):
    import re

    from tests.train_fixtures import step_losses

    healed = _run(tmp_path / "healed", FAST, {"MEGASMOL_FAULT": "raise:8", "MEGASMOL_FAULT_RANK": "1"})
    lines = [line for line in healed.stdout.splitlines() if "in-process restart" in line]
    assert len(lines) == 1, healed.stdout
    assert re.fullmatch(r"in-process restart 1 of at most 3: rank 1 raised \(PlannedFault: planned fault "
                        r"\(MEGASMOL_FAULT=raise:8\) on rank 1\); resumed from step 6; step 7 done "
                        r"[\d.]+ s after the fault", lines[0]), lines[0]
    assert "trained to step 12" in healed.stdout
    assert "audit: OK" in healed.stdout and healed.stdout.count("audit: OK") == 1  # not again

    # The same job without the fault: Megatron's resume from a checkpoint is exact (test_resume), so
    # this is also the run resumed from step 6.
    plain = _run(tmp_path / "plain", {"in_process_restart": False})
    after, before = step_losses(tmp_path / "healed" / "run"), step_losses(tmp_path / "plain" / "run")
    assert sorted(after) == list(range(1, STEPS + 1))
    assert after == before  # bit for bit: JSON floats of every step, 7 (rerun) to 12 included
    assert plain.stdout.count("in-process restart") == 0

