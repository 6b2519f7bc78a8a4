"""Run model-generated code where it can neither escape nor forge its verdict (the runner, the
two confined roles in ``child.py``, the kernel confinement in ``confine.py``)."""

from megasmol.eval.sandbox.runner import CodeTest, Limits, Outcome, run_test, run_tests

__all__ = ["CodeTest", "Limits", "Outcome", "run_test", "run_tests"]
