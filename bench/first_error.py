"""Time to the first error for the mistakes a new user makes most (issue 24): each command is run
as a user runs it, and the bench records its wall time to exit, its exit code, and whether the
error is one line (no traceback). Run: ``python bench/first_error.py [--out FILE.json]``.

The target: argument and config errors within about 2 s (checked before torch, Megatron-Core or
transformers load), every one a single line naming the field or file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = "examples/tiny/demo.yaml"


def mistakes(tmp: Path) -> list[tuple[str, list[str]]]:
    fake_ckpt = tmp / "ckpt"
    fake_ckpt.mkdir()
    (fake_ckpt / "latest").write_text("iter_0000010\n")
    fake_hf = tmp / "hf-model"
    fake_hf.mkdir()
    (fake_hf / "config.json").write_text("{}")
    score = ["eval", "tasks", "--hf", str(fake_hf), "--tasks", "demo_code"]
    return [
        ("config file missing", ["train", "--config", "nope.yaml"]),
        ("unknown config key", ["train", "--config", DEMO, "--set", "training.trian_steps=5"]),
        ("zero steps", ["train", "--config", DEMO, "--set", "training.train_steps=0"]),
        ("warmup longer than the run", ["train", "--config", DEMO, "--set", "training.train_steps=5"]),
        ("data root missing (audit)", ["data-audit", "--config", DEMO, "--set", "data.root=/missing"]),
        ("preflight, config missing", ["preflight", "--config", "nope.yaml"]),
        ("eval --hf given a megasmol checkpoint", score[:3] + [str(fake_ckpt)] + score[4:]),
        ("eval --hf missing", score[:3] + ["/missing"] + score[4:]),
        ("eval unknown task", score[:-1] + ["nosuch_task"]),
        ("eval --batch-tokens 0", score + ["--batch-tokens", "0"]),
        ("eval --out is a file", score + ["--out", "README.md"]),
        ("generate negative length", ["generate", "--checkpoint", "/missing", "--prompt", "a",
                                      "--max-new-tokens", "-5"]),
        ("demo --steps too small", ["demo", "--steps", "3"]),
        ("export a missing checkpoint", ["export-hf", "--checkpoint", "/missing", "--out", str(tmp / "hf")]),
        ("prepare-data missing input", ["prepare-data", "--input", "/missing.jsonl", "--out",
                                        str(tmp / "d")]),
        ("prepare-chat missing input", ["prepare-chat", "--input", "/missing.jsonl", "--out",
                                        str(tmp / "c")]),
        ("average all-zero weights", ["average", "--checkpoints", str(fake_ckpt), str(fake_ckpt), "--weights",
                                      "0", "0", "--no-normalize", "--out", str(tmp / "avg")]),
        ("compare a missing run", ["compare", "/missing"]),
        ("ablate --out is a file", ["ablate", "--config", DEMO, "--vary", "schedule.lr=1e-3,2e-3", "--out",
                                    "README.md"]),
        ("chat a missing checkpoint", ["chat", "--checkpoint", "/missing", "--message", "hi"]),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in mistakes(Path(tmp)):
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "megasmol", *argv], capture_output=True, text=True,
                                  cwd=REPO, timeout=300)
            seconds = time.perf_counter() - started
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            rows.append({"mistake": name, "seconds": round(seconds, 2), "exit": proc.returncode,
                         "one_line": proc.returncode != 0 and "Traceback" not in proc.stderr,
                         "message": lines[-1][:150] if lines else proc.stdout.strip()[-150:]})
            print(f"{seconds:6.2f} s  exit {proc.returncode}  {'ok ' if rows[-1]['one_line'] else 'BAD'}  "
                  f"{name}: {rows[-1]['message']}")
    slow = [r for r in rows if r["seconds"] > 2.0]
    bad = [r for r in rows if not r["one_line"]]
    print(f"{len(rows)} mistakes: median {sorted(r['seconds'] for r in rows)[len(rows) // 2]:.2f} s, "
          f"max {max(r['seconds'] for r in rows):.2f} s, {len(slow)} over 2 s, {len(bad)} not one line")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
