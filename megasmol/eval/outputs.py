"""What an evaluation leaves on disk: ``results.json`` (per task: each metric, its standard
error, the example count, the chance level, the data's source; for generative tasks, how many
generations were cut at ``max_gen_tokens``; per suite its macro average) and ``samples.jsonl``
(per example: prompt, continuations, log-likelihoods, prediction, gold), both written to a
temporary name and renamed when complete. ``megasmol eval tasks`` and the training loop write an
``api.Report`` with :func:`write_report`; the command into a new ``OUT/MODEL/TIMESTAMP/``
(:func:`write_new_outputs`), never over an earlier evaluation's (into ``OUT`` itself only with
``--overwrite``), the loop into ``RUN_DIR/downstream/iter_STEP/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from megasmol.errors import OutputExists
from megasmol.eval.formulations.registry import formulation
from megasmol.eval.runner import TaskResult

if TYPE_CHECKING:
    from megasmol.eval.api import Report
    from megasmol.eval.tasks.suites import SuiteResult


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    """``report``'s results.json and samples.jsonl in ``out_dir`` (the one way both the command
    and the loop write them)."""
    return write_outputs(report.results, out_dir, report.model, report.settings, report.suites)


def write_outputs(results: list[TaskResult], out_dir: Path, model: str,
                  settings: dict, suites: Sequence[SuiteResult] = ()) -> tuple[Path, Path]:
    """``suites``: ``suites.SuiteResult`` of the suites asked for (their averages)."""
    from megasmol.utils.fs import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {"model": model, "settings": settings, "results": {r.name: r.to_json() for r in results}}
    if suites:
        doc["suites"] = {s.name: s.to_json() for s in suites}
    results_path, samples_path = out_dir / "results.json", out_dir / "samples.jsonl"
    lines = []
    for r in results:
        for s in r.samples:
            lines.append(json.dumps({"task": r.name, "index": s.index, "prompt": s.prompt,
                                     "continuations": s.continuations,
                                     "loglikelihoods": s.loglikelihoods, "gold": s.gold,
                                     "prediction": s.prediction, "prediction_norm": s.prediction_norm,
                                     **({formulation(r.formulation).extracted_key: s.extracted}
                                        if s.extracted is not None else {}),
                                     **({"unconditional_loglikelihoods": s.unconditional}
                                        if s.unconditional is not None else {}),
                                     **({"truncated": s.truncated} if s.truncated is not None else {}),
                                     **s.metrics}))
    atomic_write_text(samples_path, "\n".join(lines) + ("\n" if lines else ""))
    atomic_write_text(results_path, json.dumps(doc, indent=2))
    return results_path, samples_path


def model_dirname(model: str) -> str:
    """The per-model directory name, as lm-eval makes it from the model's name: the path (relative
    to the current directory when beneath it) with ``/`` and the characters a file name cannot
    hold replaced by ``__`` (``runs/demo/hf`` -> ``runs__demo__hf``)."""
    from megasmol.utils.fs import shown

    name = re.sub(r"[\"<>:/|\\?*\[\]\s]+", "__", shown(model).strip("/")).strip("_")
    if name in ("", ".", ".."):
        name = Path(model).resolve().name or "model"
    return name[:200]


def write_new_outputs(results: list[TaskResult], out: Path, model: str, settings: dict,
                      suites: Sequence[SuiteResult] = (),
                      now: Optional[datetime] = None) -> tuple[Path, Path]:
    """``megasmol eval tasks``'s outputs, never replacing an earlier evaluation's (lm-eval's
    layout): :func:`write_outputs` into a new ``OUT/MODEL/TIMESTAMP/`` (``-2``, ``-3``... when
    one of that second exists), written as a hidden temporary directory beside it and renamed
    into place once both files are complete. ``--overwrite`` writes into ``OUT`` itself instead."""
    parent = Path(out) / model_dirname(model)
    parent.mkdir(parents=True, exist_ok=True)
    stamp = (now or datetime.now()).strftime("%Y-%m-%dT%H-%M-%S")
    staging = parent / f".{stamp}.tmp-{os.getpid()}"
    try:
        write_outputs(results, staging, model, settings, suites)
        for attempt in range(1, 1000):
            final = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
            if final.exists():
                continue
            try:
                os.rename(staging, final)  # refused if one was made meanwhile and holds files
            except OSError:
                continue
            return final / "results.json", final / "samples.jsonl"
        raise OutputExists(f"{parent}: no free name for the results of {stamp}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_new_report(report: Report, out: Path, now: Optional[datetime] = None) -> tuple[Path, Path]:
    """:func:`write_report` into a new ``OUT/MODEL/TIMESTAMP/`` (:func:`write_new_outputs`)."""
    return write_new_outputs(report.results, out, report.model, report.settings, report.suites, now)
