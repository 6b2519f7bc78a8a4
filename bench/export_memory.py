"""Peak memory of `megasmol export-hf` on SmolLM3-3B (the export must stream tensor by tensor).

Writes a random bf16 smollm3-3b checkpoint (once), exports it in a fresh process and reports
that process's peak RSS against the model's size.  Needs ~13 GB of disk and ~8 GB of memory.

    python bench/export_memory.py --workdir /tmp/export-bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

EXPORT = """
import resource, sys, time
from megasmol.cli import main
t = time.time()
code = main(["export-hf", "--checkpoint", sys.argv[1], "--out", sys.argv[2], "--overwrite", "--quiet"])
print("RESULT", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.time() - t)
sys.exit(code)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/megasmol-export-bench")
    parser.add_argument("--spec", default="smollm3-3b")
    args = parser.parse_args()
    work = Path(args.workdir)
    ckpt = work / "ckpt"
    if not (ckpt / "latest").is_file():
        t = time.time()
        subprocess.run([sys.executable, "-m", "megasmol", "init", "--spec", args.spec,
                        "--dtype", "bfloat16", "--out", str(ckpt)], check=True)
        print(f"init + save: {time.time() - t:.0f}s")
    proc = subprocess.run([sys.executable, "-c", EXPORT, str(ckpt), str(work / "hf")],
                          capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout, proc.stderr)
        return 1
    line = next(out for out in proc.stdout.splitlines() if out.startswith("RESULT"))
    peak, seconds = int(line.split()[1]), float(line.split()[2])
    model_bytes = sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))
    result = {"spec": args.spec, "model_bytes": model_bytes, "peak_rss_bytes": peak,
              "peak_over_model": round(peak / model_bytes, 3), "export_seconds": round(seconds, 1)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
