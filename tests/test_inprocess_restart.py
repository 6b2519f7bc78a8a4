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
