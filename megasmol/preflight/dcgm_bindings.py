"""DCGM's diagnostic through its Python bindings (``pydcgm``, ``dcgm_structs``, ``DcgmDiag``).

The bindings ship with the DCGM system package in its ``bindings/python3`` directory rather than
on PyPI; they are looked for on ``sys.path`` and then in the package's usual locations. The
diagnostic response (``dcgmDiagResponse`` v12: ``tests`` with the indices of their ``results``,
per-entity ``results``, and ``errors`` with messages) is turned into the report structure that
``dcgmi diag -j`` prints, so both paths give the same rows (``dcgm.report_rows``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

from megasmol.preflight.report import CheckResult

BINDING_DIRS = ("/usr/share/datacenter-gpu-manager-4/bindings/python3",
                "/usr/local/dcgm/bindings/python3", "/usr/share/dcgm/bindings/python3")
RESULT_NAMES = {0: "Pass", 1: "Skip", 2: "Warn", 3: "Fail", 4: "Not Run"}
GPU_ENTITY_GROUP = 1  # DCGM_FE_GPU


def load_bindings(dirs=None) -> Optional[SimpleNamespace]:
    """The bindings' modules, or None when DCGM's Python bindings are not installed."""
    dirs = BINDING_DIRS if dirs is None else dirs
    def attempt():
        try:
            return SimpleNamespace(pydcgm=importlib.import_module("pydcgm"),
                                   structs=importlib.import_module("dcgm_structs"),
                                   diag=importlib.import_module("DcgmDiag"))
        except ImportError:
            return None

    found = attempt()
    for directory in dirs:
        if found is not None:
            break
        if (Path(directory) / "pydcgm.py").is_file() and directory not in sys.path:
            sys.path.append(directory)
            found = attempt()
    return found


def _text(value) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def response_report(response) -> dict:
    """A v12 diagnostic response as ``dcgmi diag -j``'s report structure."""
    messages: dict[tuple[int, int], list[dict]] = {}
    for error in list(response.errors)[:response.numErrors]:
        key = (int(error.testId), int(error.entity.entityId))
        messages.setdefault(key, []).append({"warning": _text(error.msg)})
    tests = []
    for test_id, test in enumerate(list(response.tests)[:response.numTests]):
        results = []
        for index in list(test.resultIndices)[:test.numResults]:
            result = response.results[index]
            group = int(getattr(result.entity, "entityGroupId", GPU_ENTITY_GROUP))
            entity = int(result.entity.entityId)
            results.append({"entity_group": "GPU" if group == GPU_ENTITY_GROUP else f"entity group {group}",
                            "entity_id": entity,
                            "status": RESULT_NAMES.get(int(result.result), "Fail"),
                            "warnings": messages.get((test_id, entity), [])})
        tests.append({"name": _text(test.name), "results": results})
    return {"DCGM Diagnostic": {"test_categories": [{"category": "DCGM bindings", "tests": tests}]}}


def run_with_bindings(bindings, level: int) -> list[CheckResult]:
    """Run diagnostic ``level`` on every GPU through the host engine the bindings connect to."""
    from megasmol.preflight.dcgm import report_rows

    try:
        handle = bindings.pydcgm.DcgmHandle(ipAddress="127.0.0.1",
                                            opMode=bindings.structs.DCGM_OPERATION_MODE_AUTO)
    except Exception as exc:  # the bindings raise their own DCGMError types
        return [CheckResult("dcgm", "fail", f"DCGM bindings could not reach the host engine: {exc}",
                            details={"error": str(exc), "path": "bindings"})]
    try:
        response = bindings.diag.DcgmDiag(testNamesStr=str(level)).Execute(handle.handle)
    except Exception as exc:
        return [CheckResult("dcgm", "fail", f"DCGM diagnostic level {level} failed to run: {exc}",
                            details={"error": str(exc), "path": "bindings"})]
    finally:
        handle.Shutdown()
    return report_rows(response_report(response))
