#!/usr/bin/env python3
"""One table of several models' scores: each directory's ``results.json`` (``megasmol eval
tasks --out DIR``: every task's metrics, in DIR/MODEL/TIMESTAMP/: the newest one is read; or in
DIR itself, written with ``--overwrite``) and ``passkey.json`` (``megasmol eval passkey --out
DIR``: retrieval accuracy), one row per directory; the last row minus the first shows what a
merge or a training stage changed.

    python tools/score_table.py runs/merge-eval/sft runs/merge-eval/apo-soup runs/merge-eval/merged
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megasmol.utils.table import format_table  # noqa: E402

SKIP = {"formulation", "examples", "chance", "num_fewshot", "primary_metric", "source",
        "max_gen_tokens", "truncated", "truncated_fraction"}
"""What results.json says about a task besides its metrics."""


def results_file(directory: Path) -> Path | None:
    """``DIR/results.json``, else the newest evaluation's under it (``DIR/MODEL/TIMESTAMP/``, or
    ``DIR/TIMESTAMP/`` when DIR is a model's directory); several models' there is a mistake."""
    if (directory / "results.json").is_file():
        return directory / "results.json"
    found = ([p for p in directory.glob("*/results.json") if not p.parent.name.startswith(".")]
             or [p for p in directory.glob("*/*/results.json")
                 if not p.parent.name.startswith(".")])  # a hidden one is still being written
    if not found:
        return None
    models = sorted({p.parent.parent for p in found})
    if len(models) > 1:
        raise SystemExit(f"score_table: {directory} holds evaluations of {len(models)} models "
                         f"({', '.join(m.name for m in models[:3])}); give one model's directory")
    return max(found, key=lambda p: (p.stat().st_mtime, p.parent.name))


def scores(directory: Path) -> dict[str, float]:
    found: dict[str, float] = {}
    results = results_file(directory)
    if results is not None:
        for task, values in json.loads(results.read_text())["results"].items():
            for metric, value in values.items():
                if (metric not in SKIP and not metric.endswith("_stderr")
                        and isinstance(value, (int, float)) and not isinstance(value, bool)):
                    found[f"{task} {metric}"] = value
    passkey = directory / "passkey.json"
    if passkey.is_file():
        found["passkey accuracy"] = json.loads(passkey.read_text())["overall"]
    if not found:
        raise SystemExit(f"score_table: {directory} has neither results.json nor passkey.json")
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, help="evaluation output directories, in order")
    args = parser.parse_args(argv)
    table = {d.name: scores(d) for d in args.dirs}
    columns = sorted({c for row in table.values() for c in row})
    rows = [["model", *columns]]
    for name, row in table.items():
        rows.append([name, *(f"{row[c]:.4f}" if c in row else "-" for c in columns)])
    if len(table) > 1:
        first, last = list(table.values())[0], list(table.values())[-1]
        rows.append(["last - first", *(f"{last[c] - first[c]:+.4f}" if c in first and c in last else "-"
                                       for c in columns)])
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
