"""What a local copy of the training state costs (``resilience.local_checkpoint_every``) against a
checkpoint save, and what loading each back costs.

    python bench/local_copy_cost.py [--workdir DIR] [--rounds 4] [--spec smollm3-tiny]

2 gloo ranks (torchrun) train the tests' data on ``--spec`` (fp32, the distributed optimizer's
defaults); after each of ``--rounds`` steps, both ranks write a synchronous checkpoint to
``checkpoint.dir`` on disk and a local copy to ``/dev/shm`` through NVRx's
``LocalCheckpointManager`` (``train/local_copies.py``), the order alternating by round; each is
timed on rank 0 from a barrier before to a barrier after. Then both are loaded back once (a local
copy: the manager's ``find_latest`` and ``load``, then Megatron's ``to_state_dict``; the
checkpoint: ``dist_checkpointing.load``). Rank 0 prints the times and the sizes (its own local
file; the whole checkpoint directory).
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _config(work: Path, spec: str, rounds: int) -> Path:
    from tests.train_fixtures import write_training_run

    path = write_training_run(work, steps=rounds + 2, checkpoint={"interval": 0, "keep_last": 0},
                              training={"collective_timeout_s": 30},
                              resilience={"in_process_restart": True, "local_checkpoint_every": 1})
    config = yaml.safe_load(path.read_text())
    config["model"] = spec
    config["eval"] = {"interval": 0}
    path.write_text(yaml.safe_dump(config))
    return path


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _worker(config_path: str, rounds: int) -> None:
    import torch

    from megasmol.config.run import load_run_config
    from megasmol.runtime.distributed import init_distributed
    from megasmol.train import local_copies
    from megasmol.train.loop import Trainer
    from megasmol.train.setup import build_setup

    config = load_run_config(config_path)
    init_distributed(config.training.collective_timeout_s)
    rank0 = torch.distributed.get_rank() == 0
    setup = build_setup(config)
    local = local_copies.LocalCopies(config, setup, "bench")
    trainer = Trainer(setup)

    def timed(fn) -> float:
        torch.distributed.barrier()
        started = time.perf_counter()
        fn()
        torch.distributed.barrier()
        return time.perf_counter() - started

    saves: dict[str, list[float]] = {"checkpoint": [], "local copy": []}
    for index in range(rounds):
        trainer.run_steps(until=trainer.state.step + 1)
        step = trainer.state.step
        runs = {"checkpoint": lambda: trainer.save("interval"),
                "local copy": lambda step=step: local.save(step, trainer._metadata())}
        for name in (list(runs) if index % 2 == 0 else list(runs)[::-1]):
            saves[name].append(timed(runs[name]))
    latest = trainer.checkpoints.latest()
    loads = {"local copy": timed(lambda: (local.newest(), local.restore())),
             "checkpoint": timed(lambda: trainer.checkpoints.restore(latest))}
    sizes = {"local copy": _size(next(local.manager.local_ckpt_dir.glob("iter_*"))),
             "checkpoint": _size(latest)}
    trainer.close()
    local_copies.remove(config, "bench")
    if rank0:
        print("RESULT " + json.dumps({"saves": saves, "loads": loads, "sizes": sizes}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--spec", default="smollm3-tiny")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.rounds)
        return
    from tests.conftest import free_port

    work = args.workdir or Path(tempfile.mkdtemp(prefix="local-copy-cost-"))
    config = _config(work, args.spec, args.rounds)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", __file__,
                           "--worker", str(config), "--rounds", str(args.rounds)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"the bench failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    for name in ("checkpoint", "local copy"):
        times = result["saves"][name]
        print(f"{name:10s}  save median {statistics.median(times):.3f} s "
              f"({' '.join(f'{t:.3f}' for t in times)})  load {result['loads'][name]:.3f} s  "
              f"size {result['sizes'][name] / 1e6:.1f} MB")
    saves = result["saves"]
    ratio = statistics.median(saves["checkpoint"]) / statistics.median(saves["local copy"])
    print(f"checkpoint save / local copy save = {ratio:.1f}x (medians)")


if __name__ == "__main__":
    main()
