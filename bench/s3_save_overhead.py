"""Step-time overhead of saving checkpoints to S3-compatible storage vs saving to local disk.

    python bench/s3_save_overhead.py [--spec smollm3-tiny] [--steps 40] [--interval 5] [--rounds 2]

The same training run (the demo corpus, built in a temporary directory) with an asynchronous save
every ``--interval`` steps, twice per round: ``checkpoint.dir`` on local disk, and
``checkpoint.dir: s3://...`` on a moto server on the loopback interface (``tools/local_s3.py``),
where each checkpoint is written to the staging directory at disk speed and uploaded by rank 0 on
a thread of its own. The two alternate (in turn first in each round), so machine noise hits both
alike. The figure is the training wall time from the end of step 1 to the last step (the sum of the
per-step ``step_time_s`` the run logs with ``logging.interval: 1``, which includes what a save
stalls the loop for), compared per round. Target (issue 39): S3 at most 5% over local.

``--train-threads 1`` on a 2-core machine leaves one core to the upload thread and the loopback
server, as a GPU node leaves its spare cores (its loop drives the GPU from one); by default
training takes every core, so whatever the upload and the server compute comes out of training's
time (the cost of a CPU-bound machine, not of the upload's design).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from megasmol.utils.argtypes import positive_int

REPO = Path(__file__).resolve().parents[1]


def _config(work: Path, name: str, args, checkpoint_dir: str) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": args.spec, "run_dir": str(work / name),
        "data": {"recipe": "demo", "root": str(work / "corpus" / "tokens"),
                 "seq_length": args.seq_length, "validation_fraction": 0.0},
        "training": {"train_steps": args.steps, "global_batch_size": args.global_batch,
                     "micro_batch_size": args.micro_batch, "precision": "fp32", "seed": 1},
        "schedule": {"kind": "wsd", "lr": 5e-3, "warmup_steps": 4, "decay_fraction": 0.25},
        "checkpoint": {"dir": checkpoint_dir, "interval": args.interval, "keep_last": 2,
                       "async_save": True},
        "logging": {"interval": 1, "tensorboard": False, "progress": False},
        "eval": {"interval": 0},
    }))
    return path


def _train(config: Path, env: dict) -> tuple[float, str]:
    """Seconds from the end of step 1 to the end of the last step, and the run's output."""
    done = subprocess.run([sys.executable, "-m", "megasmol", "train", "--config", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"training failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    run_dir = Path(yaml.safe_load(config.read_text())["run_dir"])
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            steps[record["step"]] = record["step_time_s"]
    return sum(t for step, t in steps.items() if step > 1), done.stdout + done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="smollm3-tiny")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--interval", type=int, default=5, help="save every this many steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--port", type=int, default=5077)
    parser.add_argument("--server-nice", type=int, default=19,
                        help="the S3 server's nice value (0: the same priority as training)")
    parser.add_argument("--train-threads", type=positive_int, default=None,
                        help="torch threads of each training run (OMP_NUM_THREADS; default: "
                             "torch's, every core). Fewer than the cores leaves the upload and the "
                             "loopback server a core of their own, as a GPU node's spare cores do")
    args = parser.parse_args()

    from megasmol.data.demo_corpus import build_demo_corpus, tokenize_demo_corpus

    work = Path(tempfile.mkdtemp(prefix="s3bench-"))
    build_demo_corpus(work / "corpus")
    tokenize_demo_corpus(work / "corpus", show_progress=False)
    server = work / "s3"
    # The server stands in for storage on other machines: at the lowest CPU priority (unless
    # --server-nice 0), it takes only the CPU that training leaves, as a remote server takes none.
    nice = ["nice", "-n", str(args.server_nice)] if args.server_nice else []
    subprocess.run([*nice, sys.executable, str(REPO / "tools" / "local_s3.py"), "start", "--dir", str(server),
                    "--port", str(args.port), "--bucket", "bench"], check=True)
    env = dict(os.environ)
    for line in (server / "aws.env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if args.train_threads is not None:
        env["OMP_NUM_THREADS"] = str(args.train_threads)
    rows = []
    try:
        for round_ in range(args.rounds):
            kinds = ["local", "s3"] if round_ % 2 == 0 else ["s3", "local"]
            times = {}
            for kind in kinds:
                name = f"{kind}-{round_}"
                target = str(work / name / "ckpt") if kind == "local" else f"s3://bench/{name}"
                started = time.perf_counter()
                times[kind], output = _train(_config(work, name, args, target), env)
                uploads = output.count("checkpoints: uploaded ")
                if kind == "s3" and (uploads == 0 or "failed" in output):
                    raise SystemExit(f"the S3 run did not upload as expected:\n{output[-3000:]}")
                print(f"round {round_ + 1} {kind:5s}: {times[kind]:.2f} s for steps 2-{args.steps} "
                      f"({time.perf_counter() - started:.0f} s with start-up"
                      f"{f', {uploads} uploads' if kind == 's3' else ''})", flush=True)
            rows.append(times)
    finally:
        subprocess.run([sys.executable, str(REPO / "tools" / "local_s3.py"), "stop", "--dir", str(server)])
    ratios = [row["s3"] / row["local"] for row in rows]
    threads = env.get("OMP_NUM_THREADS", f"torch's default ({os.cpu_count()} cores)")
    print(f"\n{args.spec}, {args.steps} steps, a save every {args.interval} (async), "
          f"{args.rounds} rounds, training threads: {threads}")
    print("| round | local (s) | s3 (s) | s3 / local |\n|---|---|---|---|")
    for index, (row, ratio) in enumerate(zip(rows, ratios), 1):
        print(f"| {index} | {row['local']:.2f} | {row['s3']:.2f} | {ratio:.3f} |")
    total = sum(r["s3"] for r in rows) / sum(r["local"] for r in rows)
    print(f"\nmedian ratio {statistics.median(ratios):.3f}; all rounds together {total:.3f} "
          "(target: <= 1.05)")


if __name__ == "__main__":
    main()
