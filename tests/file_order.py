"""The order in which `make test` hands test files to its pytest-xdist workers: longest first.

With ``--dist loadfile`` a worker takes a whole file at a time, in collection order, and the run
ends when the busier worker ends. xdist's default (``--loadscope-reorder``) sorts files by their
number of tests, so the files with one long test (the demo, the fast docs pages) were handed out
last and one worker ran them while the other sat idle. The Makefile passes
``--no-loadscope-reorder`` and this plugin sorts the collection by each file's recorded time,
longest first (longest processing time first: the tail is made of short files). A file missing
from the table goes first, so a new slow file never lands at the end; add it to the table.

Refresh the table from a whole run: ``MEGASMOL_FILE_SECONDS=durations.json make test`` writes each
file's seconds in the parallel phase (setup, call and teardown of its tests, as the workers
reported them) to that JSON file, longest first.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

# Seconds per file in the parallel phase (setup + call + teardown), recorded by
# MEGASMOL_FILE_SECONDS in `make test` on a clean clone at bd1f5d0 (2-core VM, 2026-12-08 night,
# the machine otherwise idle).
# Only the order matters: a figure off by half leaves the schedule nearly as good.
FILE_SECONDS = {
    "tests/test_train.py": 238,
    "tests/test_rl.py": 156,
    "tests/test_faults.py": 144,
    "tests/test_preference.py": 117,
    "tests/test_s3_checkpoints.py": 111,
    "tests/test_launch_scripts.py": 95,
    "tests/test_sft.py": 93,
    "tests/test_eval_in_loop.py": 92,
    "tests/test_linear_cross_entropy.py": 84,
    "tests/test_eval_benchmarks.py": 76,
    "tests/test_optimizers.py": 74,
    "tests/test_docs_walkthroughs.py": 70,
    "tests/test_demo.py": 67,
    "tests/test_eval_tasks.py": 66,
    "tests/test_optimizer_branches.py": 62,
    "tests/test_branch.py": 59,
    "tests/test_object_store.py": 46,
    "tests/test_longctx.py": 42,
    "tests/test_s3_readers.py": 40,
    "tests/test_average.py": 38,
    "tests/test_parallel.py": 35,
    "tests/test_ablate.py": 35,
    "tests/test_preference_trl.py": 33,
    "tests/test_convert.py": 33,
    "tests/test_cpu_compat.py": 30,
    "tests/test_trackers.py": 29,
    "tests/test_preflight.py": 28,
    "tests/test_chat_data.py": 25,
    "tests/test_sandbox.py": 24,
    "tests/test_docs.py": 22,
    "tests/test_decode.py": 22,
    "tests/test_import_guard.py": 22,
    "tests/test_generate_cache.py": 20,
    "tests/test_demo_corpus.py": 19,
    "tests/test_compare_divergence.py": 17,
    "tests/test_console.py": 15,
    "tests/test_prepare_data.py": 13,
    "tests/test_eval_generation.py": 13,
    "tests/test_attention.py": 12,
    "tests/test_preference_data.py": 11,
    "tests/test_threads.py": 10,
    "tests/test_prompts_data.py": 9,
    "tests/test_cli_hints.py": 9,
    "tests/test_plan.py": 7,
    "tests/test_file_order.py": 6,
    "tests/test_checkpoint_safety.py": 6,
    "tests/test_children.py": 5,
    "tests/test_callbacks.py": 5,
    "tests/test_local_copies.py": 5,
    "tests/test_data_audit.py": 5,
    "tests/test_grpo_trl.py": 3,
    "tests/test_rewards.py": 3,
    "tests/test_rl_engines.py": 3,
    "tests/test_eval_embedded.py": 2,
    "tests/test_objective.py": 1,
    "tests/test_config_cli.py": 1,
    "tests/test_data_loader.py": 1,
    "tests/test_layer_wise_groups.py": 0,
    "tests/test_spec.py": 0,
    "tests/test_document_masking.py": 0,
    "tests/test_param_groups.py": 0,
    "tests/test_throughput_watch.py": 0,
    "tests/test_rl_policy_loss.py": 0,
    "tests/test_inprocess_restart.py": 0,
    "tests/test_run_lock.py": 0,
    "tests/test_lm_eval_fidelity.py": 0,
    "tests/test_rl_config.py": 0,
    "tests/test_rewards_config.py": 0,
    "tests/test_data_layers.py": 0,
    "tests/test_rl_packing.py": 0,
    "tests/test_rl_demo_task.py": 0,
    "tests/test_schedules.py": 0,
    "tests/test_layers.py": 0,
    "tests/test_eval_layers.py": 0,
    "tests/test_logp_agreement.py": 0,
    "tests/test_fault_notes.py": 0,
}


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def longest_first(items: list) -> list:
    """``items`` grouped by file, files by recorded seconds (unknown files first, then longest
    first; ties by name), each file's tests in their own order."""
    def key(item):
        seconds = FILE_SECONDS.get(file_of(item.nodeid), float("inf"))
        return (-seconds, file_of(item.nodeid))

    return sorted(items, key=key)  # stable: a file's tests keep their order


def pytest_collection_modifyitems(config, items):
    items[:] = longest_first(items)


_seconds: defaultdict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    _seconds[file_of(report.nodeid)] += report.duration


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    out = os.environ.get("MEGASMOL_FILE_SECONDS")
    # The xdist controller of the parallel phase writes it (not a worker, not the serial phase).
    parallel = getattr(session.config.option, "numprocesses", None)
    if not out or not parallel or hasattr(session.config, "workerinput"):
        return
    # At least 0.1: a file of quick tests (under 0.05 s) must not read as 0 s, i.e. not run.
    table = {name: max(round(seconds, 1), 0.1)
             for name, seconds in sorted(_seconds.items(), key=lambda kv: -kv[1])}
    with open(out, "w") as f:
        json.dump(table, f, indent=1)
