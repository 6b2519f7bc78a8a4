"""``math`` in ``verify`` mode: the optional ``math-verify`` package (``pip install
math-verify``) judges symbolic equivalence. It times its parsing and comparison out with
``signal.alarm``, which works only in a process's main thread, so each answer is judged in a
worker process of a bounded pool; a worker that dies or an answer that raises scores 0."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Optional

from megasmol.config.typed import ConfigError


def judge(completion: str, reference: str) -> float:
    """In a worker: 1.0 when math-verify finds the completion's answer equal to the reference."""
    from math_verify import parse, verify  # type: ignore[import-not-found]  # optional

    gold = parse(reference) or parse(f"${reference}$")
    if not gold:
        return 0.0
    return float(verify(gold, parse(completion)))


class Verifier:
    def __init__(self, workers: int):
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ConfigError("math reward, mode verify: the math-verify package is not installed "
                              "(pip install math-verify); or use flexible / strict") from None
        self.workers = workers
        self._pool: Optional[ProcessPoolExecutor] = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        return self._pool

    def score(self, completions: list[str], references: list[Optional[str]]) -> list[Optional[float]]:
        out: list[Optional[float]] = [None] * len(completions)
        futures = {i: self._executor().submit(judge, c, r)
                   for i, (c, r) in enumerate(zip(completions, references)) if r is not None}
        for index, future in futures.items():
            try:
                out[index] = float(future.result())
            except BrokenProcessPool:
                out[index] = 0.0
                self.close()  # a fresh pool for the next batch
            except Exception:  # noqa: BLE001 - an answer math-verify cannot judge scores 0
                out[index] = 0.0
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
