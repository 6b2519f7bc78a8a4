"""NVIDIA DCGM diagnostics: through DCGM's Python bindings when they are importable, else
``dcgmi diag -r LEVEL -j``; either way the report becomes the same rows.

Levels: 1 software checks; 2 adds memory and PCIe tests; 3 adds targeted stress / power, memory
bandwidth and NCCL tests (15-30 min); 4 adds memtest and pulse tests (1-2 h). The JSON has
``{"DCGM Diagnostic": {"test_categories": [{"category", "tests": [{"name", "results":
[{"entity_group", "entity_id", "status", "warnings"}], "test_summary": {"status"}}]}]}}`` with
status Pass, Fail, Warn, Skip or Not Run. One row per GPU: its worst status, naming the tests
that failed or warned and their messages.
"""

from __future__ import annotations

import json
import shutil
import subprocess

from megasmol.preflight.report import CheckResult, skipped, worst

STATUS = {"pass": "pass", "fail": "fail", "warn": "warn", "skip": "skip", "not run": "skip"}


def _messages(result: dict) -> list[str]:
    out = []
    for item in result.get("warnings") or []:
        out.append(item.get("warning", str(item)) if isinstance(item, dict) else str(item))
    return out


def parse_dcgm_json(text: str) -> list[CheckResult]:
    """Rows from ``dcgmi diag -j`` output; a runtime error or unreadable output is one failing row."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [CheckResult("dcgm", "fail", f"dcgmi output is not JSON ({exc}): {text[:200]!r}")]
    return report_rows(data)


def report_rows(data) -> list[CheckResult]:
    """Rows from a diagnostic report in ``dcgmi diag -j``'s structure (also what the bindings'
    response is turned into, so both paths give the same rows)."""
    diag = data.get("DCGM Diagnostic") if isinstance(data, dict) else None
    if not isinstance(diag, dict):
        return [CheckResult("dcgm", "fail", "dcgmi output has no 'DCGM Diagnostic' section")]
    error = diag.get("runtime_error") or data.get("runtime_error") or data.get("error")
    if error:
        return [CheckResult("dcgm", "fail", f"dcgmi diag could not run: {error}", details={"error": error})]
    per_gpu: dict[str, list[tuple[str, str, list[str]]]] = {}
    for category in diag.get("test_categories", []):
        for test in category.get("tests", []):
            for result in test.get("results", []):
                entity = f"{result.get('entity_group', 'GPU')} {result.get('entity_id', '?')}"
                status = STATUS.get(str(result.get("status", "")).lower(), "fail")
                per_gpu.setdefault(entity, []).append((test.get("name", "?"), status, _messages(result)))
    if not per_gpu:
        return [CheckResult("dcgm", "fail", "dcgmi diag reported no test results")]
    rows = []
    for entity, tests in sorted(per_gpu.items()):
        ran_statuses = [s for _, s, _ in tests if s != "skip"]
        status = worst(ran_statuses) if ran_statuses else "skip"
        bad = [f"{name} {s.upper()}" + (f" ({'; '.join(msgs)})" if msgs else "")
               for name, s, msgs in tests if s in ("fail", "warn")]
        ran = sum(s != "skip" for _, s, _ in tests)
        summary = f"{ran} test(s) run" + (": " + ", ".join(bad) if bad else ", all passed")
        rows.append(CheckResult("dcgm", status, summary, entity,
                                {"tests": [{"name": n, "status": s, "warnings": m} for n, s, m in tests]}))
    return rows


def run_dcgm(level: int, timeout_s: float) -> list[CheckResult]:
    """Through DCGM's Python bindings when they import (``dcgm_bindings.py``), else ``dcgmi``."""
    from megasmol.preflight.dcgm_bindings import load_bindings, run_with_bindings

    bindings = load_bindings()
    if bindings is not None:
        return run_with_bindings(bindings, level)
    exe = shutil.which("dcgmi")
    if exe is None:
        return [skipped("dcgm", "DCGM is not installed (no dcgmi on PATH); the other checks still ran")]
    try:
        proc = subprocess.run([exe, "diag", "-r", str(level), "-j"], capture_output=True, text=True,
                              timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return [CheckResult("dcgm", "fail", f"dcgmi diag -r {level} did not finish in {timeout_s:.0f}s")]
    text = proc.stdout.strip() or proc.stderr.strip()
    return parse_dcgm_json(text)
