"""megasmol preflight: DCGM parsing, exit codes, stragglers over gloo, the dry-run, the CPU run."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megasmol.preflight.dcgm import parse_dcgm_json, run_dcgm
from megasmol.preflight.report import CheckResult, PreflightReport
from tests.conftest import REPO, cli_in_process, free_port

FIXTURES = Path(__file__).parent / "fixtures" / "dcgm"


def _report(rows):
    report = PreflightReport(host="h")
    report.extend(rows)
    return report


@pytest.mark.parametrize("fixture,statuses,exit_code,strict_exit", [
    ("all_pass.json", {"GPU 0": "pass", "GPU 1": "pass"}, 0, 0),
    ("gpu1_memory_fail.json", {"GPU 0": "pass", "GPU 1": "fail"}, 1, 1),
    ("warnings_only.json", {"GPU 0": "warn", "GPU 1": "pass"}, 0, 1),
    ("runtime_error.json", {"node": "fail"}, 1, 1),
])
def test_dcgm_reports_parse_into_rows_and_exit_codes(fixture, statuses, exit_code, strict_exit):
    rows = parse_dcgm_json((FIXTURES / fixture).read_text())
    assert {r.target: r.status for r in rows} == statuses
    report = _report(rows)
    assert report.exit_code() == exit_code and report.exit_code(strict=True) == strict_exit
    if fixture == "gpu1_memory_fail.json":
        assert "memory FAIL (GPU 1: Uncorrectable ECC error" in rows[1].summary
        assert "NO-GO" in report.render() and "GPU 1" in report.verdict()
    if fixture == "warnings_only.json":
        assert "diagnostic WARN (GPU 0: clocks throttled" in rows[0].summary
        assert "GO (1 warning(s))" in report.render()
    if fixture == "runtime_error.json":
        assert "host engine is not running" in rows[0].summary


def test_unreadable_dcgm_output_fails_plainly():
    [row] = parse_dcgm_json("Error: unable to connect to the host engine\n")
    assert row.status == "fail" and "not JSON" in row.summary


def test_dcgmi_is_run_with_the_level_and_json_flags(tmp_path, monkeypatch):
    # A stand-in `dcgmi` on PATH records its arguments and prints a fixture report.
    fake = tmp_path / "dcgmi"
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat {FIXTURES / 'gpu1_memory_fail.json'}\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    rows = run_dcgm(2, timeout_s=30)
    assert (tmp_path / "args").read_text().split() == ["diag", "-r", "2", "-j"]
    assert [r.status for r in rows] == ["pass", "fail"]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    [row] = run_dcgm(1, timeout_s=30)
    assert row.status == "skip" and "not installed" in row.summary


def _torchrun_preflight(tmp_path, env_extra, *args):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megasmol", "preflight", "--json", str(out),
           "--skip", "gpu_visibility,gemm,memory_bandwidth,storage,data_audit,dry_run,dcgm,nvml,"
           "model_parity,training_throughput", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **env_extra}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    return proc, json.loads(out.read_text())


def test_a_slow_rank_is_named_and_fails(tmp_path):
    proc, report = _torchrun_preflight(tmp_path, {"MEGASMOL_PREFLIGHT_SLOW_RANK": "1:0.5"})
    assert proc.returncode != 0, proc.stdout
    [straggler] = [r for r in report["results"] if r["check"] == "stragglers"]
    assert straggler["status"] == "fail" and straggler["details"]["slow"] == ["rank 1"]
    assert "slow: rank 1" in proc.stdout
    ops = {r["details"]["op"]: r for r in report["results"] if r["check"] == "collectives"}
    assert set(ops) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert all(bw > 0 for r in ops.values() for bw in r["details"]["busbw_gbps"].values())


@pytest.mark.serial  # timing-sensitive: a parallel test worker on the same 2 cores made rank 1 2x slower
def test_without_the_slow_rank_both_pass(tmp_path):
    # Two ranks share this machine's two cores, so a 30% jitter between them happens; the injected
    # straggler above is 10x slower, far beyond 100%.
    proc, report = _torchrun_preflight(tmp_path, {}, "--straggler-tolerance", "1.0")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert all(r["status"] == "pass" for r in report["results"]), report
    assert "GO" in proc.stdout


def test_dry_run_rejects_an_impossible_layout(tmp_path):
    proc = cli_in_process("preflight", "--config", "examples/smollm3/pretrain.yaml", "--skip",
                          "gemm,memory_bandwidth,storage,collectives,dcgm,nvml", "--world-size", "384",
                          "--set", "parallel.tensor_parallel=3")
    assert proc.returncode == 1
    assert "dry_run" in proc.stdout and "tensor_parallel=3 does not divide" in proc.stdout


def test_planning_another_world_size_writes_nothing_here(tmp_path):
    """--world-size plans another cluster's job: neither its data nor its checkpoint directory
    are this machine's, so nothing is timed there and nothing is written (it used to write 537 MB
    and leave an empty checkpoint directory behind)."""
    run_dir = tmp_path / "planned"
    proc = cli_in_process("preflight", "--config", "examples/smollm3/pretrain.yaml", "--world-size", "384",
                          "--skip", "gemm,memory_bandwidth,collectives,dcgm,nvml,dry_run",
                          "--set", f"run_dir={run_dir}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not run_dir.exists() and not list(tmp_path.iterdir())
    [write] = [line for line in proc.stdout.splitlines() if line.startswith("storage_write")]
    assert "SKIP" in write and "nothing written (--world-size plans another job" in write


def test_the_write_test_removes_only_the_directories_it_made(tmp_path):
    from megasmol.preflight.storage import write_throughput

    (tmp_path / "kept").mkdir()
    result = write_throughput(tmp_path / "kept" / "run" / "checkpoints", 1)
    assert result["bytes"] >= 1024 * 1024
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not list((tmp_path / "kept").iterdir())
    (tmp_path / "kept" / "note").write_text("x")  # a directory that already existed stays
    write_throughput(tmp_path / "kept", 1)
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["note"]


def test_a_cpu_fp32_config_is_measured_against_this_machines_memory(monkeypatch):
    """Without a GPU an fp32 config is a CPU run: its share is per process, of this machine's
    memory, not of an assumed H100; a bf16 config checked here is for a GPU cluster, said so."""
    import torch

    from megasmol.config.run import load_run_config
    from megasmol.preflight.dryrun import GB, dry_run, host_memory_bytes

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    [cpu] = dry_run(load_run_config(REPO / "examples/tiny/demo.yaml"), world_size=1)
    assert "H100" not in cpu.summary and "per GPU" not in cpu.summary
    assert (f"GB per process of {host_memory_bytes() / GB:.0f} GB (this machine's memory: "
            "training.precision=fp32 is a CPU run") in cpu.summary
    assert cpu.details["device_memory_gb"] == host_memory_bytes() / GB
    [gpu] = dry_run(load_run_config(REPO / "examples/tiny/demo.yaml", ["training.precision=bf16"]),
                    world_size=1)
    assert "GB per GPU of 80 GB (assumed: an H100; no GPU here" in gpu.summary


def test_the_table_shows_paths_relative_to_the_current_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    report = _report([CheckResult("storage_write", "fail", f"cannot write in {tmp_path}/run/ckpt",
                                  str(tmp_path / "run" / "ckpt"))])
    table = report.render()
    assert str(tmp_path) not in table
    assert "storage_write  run/ckpt  FAIL    cannot write in run/ckpt" in table
    assert table.endswith("NO-GO: storage_write run/ckpt: cannot write in run/ckpt")


def test_dry_run_memory_of_smollm3_3b_matches_a_hand_estimate(tmp_path):
    out = tmp_path / "r.json"
    proc = cli_in_process("preflight", "--config", "examples/smollm3/pretrain.yaml", "--skip",
                          "gemm,memory_bandwidth,storage,collectives,dcgm,nvml", "--world-size", "384",
                          "--device-memory-gb", "80", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = [r for r in json.loads(out.read_text())["results"] if r["check"] == "dry_run"]
    assert row["status"] == "pass" and "TP2 PP1 CP1 DP192" in row["summary"], proc.stdout
    assert row["details"]["params_meta_built"] == 3_075_098_624
    # By hand, with the usual rules of thumb: 3.08B parameters over TP=2, 18 bytes each in mixed
    # precision without ZeRO (bf16 weight 2 + fp32 gradient 4 + fp32 master and Adam moments 12);
    # activations 34 s b h / t bytes per layer (Korthikanti et al., sequence parallel, no
    # recompute) over 36 layers at s=4096, b=3, h=2048, t=2; fp32-ish logits 10 bytes x tokens x
    # vocab / t; 3 GiB for CUDA context and buffers.
    states = 3.08e9 / 2 * 18
    activations = 34 * 4096 * 3 * 2048 / 2 * 36
    logits = 10 * 4096 * 3 * 128256 / 2
    by_hand = (states + activations + logits + 3 * 2**30) / 2**30
    estimate = row["details"]["breakdown_gb"]["total"]
    assert abs(estimate - by_hand) / by_hand < 0.20, (estimate, by_hand)
    assert estimate < 80


def test_cpu_preflight_runs_what_it_can_and_says_what_it_skipped(tmp_path):
    out = tmp_path / "report.json"
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard.bin").write_bytes(os.urandom(80 * 1024 * 1024))
    proc = cli_in_process("preflight", "--burn-seconds", "1", "--data-path", str(data), "--checkpoint-dir",
                   str(tmp_path / "ckpt"), "--min-read-gbps", "0.001", "--min-write-gbps", "0.001",
                   "--json", str(out))
    report = json.loads(out.read_text())
    status = {r["check"]: r["status"] for r in report["results"]}
    assert status == {"gpu_visibility": "skip", "gemm": "pass", "memory_bandwidth": "pass",
                      "nvml": "skip", "dcgm": "skip", "storage_read": "pass",
                      "storage_write": "pass", "data_audit": "skip", "collectives": "skip",
                      "dry_run": "skip", "model_parity": "skip", "training_throughput": "skip"}, proc.stdout
    gemm = next(r for r in report["results"] if r["check"] == "gemm")
    assert gemm["details"]["mean_tflops"] > 0 and gemm["details"]["plain_matmul_tflops"] > 0
    # The write test leaves nothing: neither its file nor the directory it made for it.
    assert "skipped: no GPU" in proc.stdout and not (tmp_path / "ckpt").exists()
    # An impossible storage floor fails the run, with exit code 1.
    slow = cli_in_process("preflight", "--skip", "gemm,memory_bandwidth,collectives", "--data-path",
                          str(data), "--min-read-gbps", "1e6")
    assert slow.returncode == 1 and "NO-GO: storage_read" in slow.stdout
    # A few MB read from caches in milliseconds: reported, not judged (the CPU example's corpus).
    (data / "shard.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    tiny = cli_in_process("preflight", "--skip", "gemm,memory_bandwidth,collectives", "--data-path",
                          str(data), "--min-read-gbps", "1e6")
    assert tiny.returncode == 0 and "too little to time" in tiny.stdout


def test_report_verdicts():
    rows = [CheckResult("gemm", "pass", "ok", "rank 0"), CheckResult("nvml", "warn", "hot", "rank 0")]
    assert _report(rows).exit_code() == 0 and _report(rows).exit_code(strict=True) == 1


def _burn(mean, throttle=()):
    return {"device": "NVIDIA H100 80GB HBM3", "size": 8192, "dtype": "bfloat16", "mean_tflops": mean,
            "min_tflops": mean * 0.95, "std_tflops": 1.0, "max_temp_c": 70, "min_sm_clock_mhz": 1980,
            "throttle": list(throttle)}


def test_gemm_judgement_follows_gpu_fryer():
    from megasmol.preflight.compute import judge_burns

    rows = judge_burns({"gpu0": _burn(700), "gpu1": _burn(690), "gpu2": _burn(600),
                        "gpu3": _burn(705, ["hw_thermal"]), "gpu4": _burn(0.0)}, tolerance=0.10)
    status = {r.target: r.status for r in rows}
    assert status == {"gpu0": "pass", "gpu1": "pass", "gpu2": "fail", "gpu3": "fail", "gpu4": "fail"}
    assert "15% below the best" in rows[2].summary and "throttled: hw_thermal" in rows[3].summary
    assert "zero FLOP/s" in rows[4].summary


def test_nvml_health_judgement():
    from megasmol.preflight.nvml_health import judge_drivers, judge_health

    healthy = {"name": "H100", "driver": "550.54", "ecc_uncorrected": 0, "retired_pages_pending": 0,
               "row_remap_pending": 0, "row_remap_failure": 0, "temp_c": 40, "temp_slowdown_c": 90,
               "power_w": 80.0, "power_limit_w": 700.0, "pcie_gen": 5, "pcie_gen_max": 5,
               "pcie_width": 16, "pcie_width_max": 16, "persistence_mode": 1}
    assert judge_health("gpu0", healthy).status == "pass"
    assert judge_health("gpu0", {**healthy, "ecc_uncorrected": 3}).status == "fail"
    assert judge_health("gpu0", {**healthy, "row_remap_failure": 1}).status == "fail"
    narrow = judge_health("gpu0", {**healthy, "pcie_width": 8, "persistence_mode": 0})
    assert narrow.status == "warn" and "PCIe x8 of x16" in narrow.summary
    assert judge_health("gpu0", {**healthy, "temp_c": 88}).status == "warn"
    assert judge_health("gpu0", None).status == "skip"
    mixed = judge_drivers({"a": healthy, "b": {**healthy, "driver": "535.104"}})
    assert mixed.status == "fail" and "535.104" in mixed.summary
    assert judge_drivers({"a": healthy, "b": healthy}).status == "pass"


def test_dry_run_checks_the_attention_layout_and_counts_all_gathered_kv():
    from megasmol.config.run import load_run_config
    from megasmol.preflight.dryrun import GB, dry_run

    def row(*overrides, path="examples/smollm3/lc_32k.yaml", world_size=64):
        config = load_run_config(REPO / path, list(overrides))
        [result] = dry_run(config, world_size=world_size, device_memory_gb=80)
        return result

    # auto: a bf16 run checked without a GPU is for the cluster (te, said so); fp32 runs here.
    assert "te attention (auto, assumed" in row().summary
    assert "sdpa attention," in row(path="examples/tiny/demo.yaml", world_size=1).summary

    # The recipe's layout (TP2 CP4, sequence parallel) on TE passes; on sdpa, whose torch norms
    # Megatron-Core will not shard, it fails naming the field, as training would.
    te = row("training.attention_backend=te", "parallel.sequence_parallel=false")
    assert te.status == "pass" and "te attention" in te.summary
    refused = row("training.attention_backend=sdpa")
    assert refused.status == "fail" and "parallel.sequence_parallel" in refused.summary
    assert row("training.attention_backend=local").status == "fail"
    # sdpa's CP keeps the other ranks' K and V for every layer (36) plus one gradient copy:
    # 3/4 of 32768 tokens x (K, V) x 4 KV heads x 128 / TP2 x 2 bytes.
    sdpa = row("training.attention_backend=sdpa", "parallel.sequence_parallel=false")
    extra = (sdpa.details["breakdown_gb"]["activations"] - te.details["breakdown_gb"]["activations"])
    by_hand = 32768 * 3 / 4 * 2 * (4 * 128 / 2) * 2 * (36 + 1) / GB
    assert sdpa.status == "pass" and abs(extra - by_hand) < 1e-6, (extra, by_hand)
    assert any("all-gathered K/V" in note for note in sdpa.details["notes"])


def _preflight_with(tmp_path, *args, path_prefix=None, monkeypatch=None):
    """The checks that read the node and the config (no timed ones), in this process."""
    out = tmp_path / "report.json"
    if path_prefix:
        monkeypatch.setenv("PATH", f"{path_prefix}:{os.environ['PATH']}")
    proc = cli_in_process("preflight", "--json", str(out),
                          "--skip", "gemm,memory_bandwidth,storage,collectives,dry_run", *args)
    rows = {(r["check"], r["target"]): r for r in json.loads(out.read_text())["results"]}
    return proc, rows


def test_gpus_the_driver_lists_but_torch_cannot_see_are_a_no_go(tmp_path, monkeypatch):
    """This machine has no GPU: stand-ins for nvidia-smi and dcgmi play a node whose driver sees
    GPUs (one failing DCGM's memory test) while torch sees none. That used to be a silent GO."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n"
                                        "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n")
    (bin_dir / "dcgmi").write_text(f"#!/bin/sh\ncat {FIXTURES / 'gpu1_memory_fail.json'}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    proc, rows = _preflight_with(tmp_path, path_prefix=bin_dir, monkeypatch=monkeypatch)
    assert proc.returncode == 1, proc.stdout
    visibility = next(r for (check, _), r in rows.items() if check == "gpu_visibility")
    assert visibility["status"] == "fail"
    assert "nvidia-smi sees 2 GPU(s) but torch sees none" in visibility["summary"]
    assert rows["dcgm", "GPU 1"]["status"] == "fail"  # DCGM ran although torch sees no GPU
    assert "NO-GO" in proc.stdout


def test_a_gpu_config_needs_gpus_unless_cpu_is_allowed(tmp_path):
    from tests.train_fixtures import write_training_run

    config = write_training_run(tmp_path / "run", steps=4)
    proc, rows = _preflight_with(tmp_path, "--config", str(config), "--set", "training.precision=bf16")
    [visibility] = [r for (check, _), r in rows.items() if check == "gpu_visibility"]
    assert proc.returncode == 1 and visibility["status"] == "fail"
    assert visibility["summary"] == "torch sees 0 GPU(s), training.precision=bf16 needs 1"
    proc, rows = _preflight_with(tmp_path, "--config", str(config), "--set", "training.precision=bf16",
                                 "--allow-cpu")
    assert proc.returncode == 0, proc.stdout
    proc, rows = _preflight_with(tmp_path, "--config", str(config))  # fp32: a CPU run
    assert proc.returncode == 0 and "GO" in proc.stdout
    assert rows["data_audit", "data"]["status"] == "pass"


def test_a_config_whose_data_is_missing_or_wrong_is_a_no_go(tmp_path):
    """The pre-flight runs the data audit on the config: missing datasets, and token ids the
    model's vocabulary cannot hold, fail it (they used to be a GO with storage_read skipped)."""
    from tests.train_fixtures import write_training_run

    config = write_training_run(tmp_path / "run", steps=4)
    proc, rows = _preflight_with(tmp_path, "--config", str(config), "--set", f"data.root={tmp_path}/gone")
    audit = [r for (check, _), r in rows.items() if check == "data_audit"]
    assert proc.returncode == 1 and audit and all(r["status"] == "fail" for r in audit)
    assert "missing" in audit[0]["summary"] and "NO-GO: data_audit" in proc.stdout
    import yaml

    spec = yaml.safe_load((tmp_path / "run" / "spec.yaml").read_text())
    (tmp_path / "small.yaml").write_text(yaml.safe_dump({**spec, "vocab_size": 16}))
    proc, rows = _preflight_with(tmp_path, "--config", str(config), "--set", f"model={tmp_path}/small.yaml")
    audit = [r for (check, _), r in rows.items() if check == "data_audit"]
    assert proc.returncode == 1 and "outside the model's vocabulary of 16" in audit[0]["summary"], audit


STAND_IN_DIAG = '''
"""A stand-in for DCGM's DcgmDiag module (DCGM cannot run on this machine): Execute returns a
response with the bindings' v12 structure (tests with result indices, per-entity results,
errors with messages), built from the dcgmi JSON report named by $STANDIN_REPORT."""
import json, os
from types import SimpleNamespace as NS

RESULT = {"Pass": 0, "Skip": 1, "Warn": 2, "Fail": 3, "Not Run": 4}
LEVELS = []


class DcgmDiag:
    def __init__(self, gpuIds=None, testNamesStr="", **kwargs):
        LEVELS.append(testNamesStr)

    def Execute(self, handle):
        report = json.load(open(os.environ["STANDIN_REPORT"]))["DCGM Diagnostic"]
        tests, results, errors = [], [], []
        for category in report["test_categories"]:
            for test in category["tests"]:
                indices = []
                for r in test["results"]:
                    indices.append(len(results))
                    entity = NS(entityGroupId=r["entity_group_id"], entityId=r["entity_id"])
                    results.append(NS(entity=entity, result=RESULT[r["status"]], testId=len(tests)))
                    for w in r["warnings"]:
                        errors.append(NS(entity=entity, testId=len(tests), code=1, msg=w["warning"].encode()))
                tests.append(NS(name=test["name"].encode(), numResults=len(indices), resultIndices=indices))
        return NS(numTests=len(tests), tests=tests, numResults=len(results), results=results,
                  numErrors=len(errors), errors=errors)
'''


@pytest.mark.parametrize("fixture", ["all_pass.json", "gpu1_memory_fail.json", "warnings_only.json"])
def test_dcgm_bindings_give_the_rows_dcgmi_gives(fixture, tmp_path, monkeypatch):
    """DCGM cannot run here: stand-in bindings (pydcgm, dcgm_structs, DcgmDiag) with the
    bindings' response structure, found in a DCGM-style bindings/python3 directory."""
    import sys

    from megasmol.preflight import dcgm_bindings

    bindings = tmp_path / "bindings" / "python3"
    bindings.mkdir(parents=True)
    (bindings / "pydcgm.py").write_text(
        "CALLS = []\nclass DcgmHandle:\n    def __init__(self, ipAddress=None, opMode=None):\n"
        "        self.handle = 7\n        CALLS.append(('connect', ipAddress, opMode))\n"
        "    def Shutdown(self):\n        CALLS.append(('shutdown',))\n")
    (bindings / "dcgm_structs.py").write_text("DCGM_OPERATION_MODE_AUTO = 1\n")
    (bindings / "DcgmDiag.py").write_text(STAND_IN_DIAG)
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in ("pydcgm", "dcgm_structs", "DcgmDiag"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(dcgm_bindings, "BINDING_DIRS", (str(bindings),))
    monkeypatch.setenv("STANDIN_REPORT", str(FIXTURES / fixture))
    monkeypatch.setenv("PATH", str(tmp_path))  # no dcgmi: only the bindings can answer
    rows = run_dcgm(2, timeout_s=30)
    expected = parse_dcgm_json((FIXTURES / fixture).read_text())
    assert [(r.target, r.status, r.summary) for r in rows] == [
        (r.target, r.status, r.summary) for r in expected]
    assert sys.modules["DcgmDiag"].LEVELS == ["2"]
    assert sys.modules["pydcgm"].CALLS == [("connect", "127.0.0.1", 1), ("shutdown",)]
    for name in ("pydcgm", "dcgm_structs", "DcgmDiag"):
        sys.modules.pop(name, None)


def test_model_checks_run_the_configs_model_and_steps(tmp_path):
    """--level standard builds the run's model with its backend and a second implementation
    (here sdpa vs Megatron-Core's local attention, fp32) and trains a few real steps."""
    from tests.train_fixtures import write_training_run

    config = write_training_run(tmp_path, steps=20, eval={"interval": 0},
                                logging={"expected_tokens_per_s_per_gpu": 1e12, "peak_tflops": 2.0})
    out = cli_in_process("preflight", "--config", str(config), "--level", "standard", "--allow-cpu",
                         "--json", str(tmp_path / "r.json"), "--skip",
                         "gemm,memory_bandwidth,storage,dcgm,nvml,collectives")
    rows = {r["check"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    parity = rows["model_parity"]
    assert parity["status"] == "pass" and parity["details"]["reference"] == "local"
    assert parity["details"]["loss_max_diff"] < 1e-4 and parity["details"]["grad_max_rel_diff"] < 1e-3
    speed = rows["training_throughput"]
    assert speed["details"]["steps_timed"] == 3 and speed["details"]["tokens_per_s_per_device"] > 0
    assert speed["details"]["mfu"] == pytest.approx(speed["details"]["model_tflops_per_device"] / 2.0)
    assert speed["status"] == "fail" and "below 80% of it" in speed["summary"]  # 1e12 is not reached
    assert out.returncode == 1 and "audit" not in out.stdout.split("check ")[0]
    quick = cli_in_process("preflight", "--config", str(config), "--allow-cpu", "--skip",
                           "gemm,memory_bandwidth,storage,dcgm,nvml,collectives,dry_run")
    assert quick.returncode == 0, quick.stdout + quick.stderr
    assert "runs at --level standard or long" in quick.stdout


@pytest.mark.parametrize("name", ["muon", "ademamix"])
def test_the_timed_steps_run_the_configs_optimizer(tmp_path, name):
    from tests.train_fixtures import write_training_run

    config = write_training_run(tmp_path, steps=20, eval={"interval": 0})
    cli_in_process("preflight", "--config", str(config), "--level", "standard", "--allow-cpu",
                   "--set", f"optim.name={name}", "--json", str(tmp_path / "r.json"), "--skip",
                   "gemm,memory_bandwidth,storage,dcgm,nvml,collectives,model_parity,data_audit,dry_run")
    rows = {r["check"]: r for r in json.loads((tmp_path / "r.json").read_text())["results"]}
    speed = rows["training_throughput"]["details"]
    assert speed["optim_name"] == name and speed["steps_timed"] == 3
    # optim.distributed (the default): the layer-wise optimizer that shards Muon / AdEMAMix
    assert "LayerWise" in speed["optimizer"]
    assert speed["tokens_per_s_per_device"] > 0 and math.isfinite(speed["last_loss"])


def test_model_parity_fails_when_the_implementations_disagree(tmp_path, monkeypatch):
    import torch

    from megasmol.config.run import load_run_config
    from megasmol.preflight import model_check
    from tests.train_fixtures import write_training_run

    copy = model_check.copy_weights

    def slightly_wrong(source, target):  # one tensor off by 1%: what a broken kernel looks like
        copy(source, target)
        with torch.no_grad():
            target.decoder.final_layernorm.weight.mul_(1.01)

    monkeypatch.setattr(model_check, "copy_weights", slightly_wrong)
    row = model_check.model_parity(load_run_config(write_training_run(tmp_path, steps=4)))
    assert row.status == "fail" and row.details["loss_max_diff"] > 1e-4
