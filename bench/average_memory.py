"""Peak memory of `megasmol average` on two SmolLM3-3B checkpoints (target: under 1.5x one
model's bytes: the output model plus one block per input, never the inputs whole).

Writes two random bf16 smollm3-3b checkpoints (once), averages them in a fresh process and
reports that process's peak RSS against the model's size. Needs ~19 GB of disk and ~9 GB of
memory.

    python bench/average_memory.py --workdir /tmp/average-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

AVERAGE = """
import resource, sys, time
from megasmol.cli import main
t = time.time()
code = main(["average", "--checkpoints", sys.argv[1], sys.argv[2], "--out", sys.argv[3], "--quiet"])
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time() - t)
sys.exit(code)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/megasmol-average-bench")
    parser.add_argument("--spec", default="smollm3-3b")
    args = parser.parse_args()
    work = Path(args.workdir)
    inputs = [work / "a", work / "b"]
    for seed, ckpt in enumerate(inputs, start=1):
        if not (ckpt / "latest").is_file():
            t = time.time()
            subprocess.run([sys.executable, "-m", "megasmol", "init", "--spec", args.spec, "--seed",
                            str(seed), "--dtype", "bfloat16", "--out", str(ckpt)], check=True)
            print(f"init + save {ckpt.name}: {time.time() - t:.0f}s", flush=True)
    out = work / "average"
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run([sys.executable, "-c", AVERAGE, *map(str, inputs), str(out)],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout, proc.stderr)
        return 1
    line = next(o for o in proc.stdout.splitlines() if o.startswith("RESULT"))
    peak, seconds = int(line.split()[1]), float(line.split()[2])
    from megasmol.ckpt.reader import CheckpointReader

    reader = CheckpointReader(out)
    model_bytes = sum(reader.shape(k).numel() * reader.dtype(k).itemsize for k in reader.keys())
    result = {"spec": args.spec, "inputs": 2, "model_bytes": model_bytes, "peak_rss_bytes": peak,
              "peak_over_model": round(peak / model_bytes, 3), "average_seconds": round(seconds, 1)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
