"""``megasmol eval list``: every built-in task and suite, with its data source, split, formulation,
size and chance level, as a Markdown table (docs/evaluation.md holds its output; a test keeps it
current)."""

from __future__ import annotations

from megasmol.eval.tasks.embedded import EMBEDDED
from megasmol.eval.tasks.registry import load_task, suite_names, task_names
from megasmol.eval.tasks.suites import load_suite


def _chance(task) -> str:
    if not task.formulation.has_chance:
        return "-"
    if task.spec.chance is not None:
        return f"{task.spec.chance:.3f}"
    examples = task.examples()
    return f"{sum(1 / len(e.choices) for e in examples) / len(examples):.3f}"


def task_rows() -> tuple[list[tuple[str, ...]], list[str]]:
    """The table's rows and the notes its ``*`` marks (a split other than the reference's)."""
    rows: list[tuple[str, ...]] = [("task", "formulation", "metric",
                                    "data (offline: megasmol[evaldata])", "split", "size", "chance")]
    notes = []
    for name in task_names() + sorted(EMBEDDED):
        task = load_task(name)
        if task.origin == "hub":  # never downloaded to be listed
            spec = task.spec
            assert spec.hf_dataset is not None  # origin "hub"
            data, split, size, chance = "hub: " + "/".join(spec.hf_dataset), spec.split, "-", "-"
        else:
            source = task.source()
            data, split = source["data"].replace("{subset}", "SUBJECT"), source["split"]
            size, chance = f"{len(task.examples()):,}", _chance(task)
            if source.get("note"):
                split += " *"
                notes.append(f"\\* `{name}`: {source['note']}.")
        rows.append((f"`{name}`", task.spec.formulation, task.spec.primary, data, split, size, chance))
    return rows, notes


def suite_rows() -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = [("suite", "tasks", "per task", "not covered")]
    for name in suite_names():
        suite = load_suite(name)
        tasks = ", ".join(f"{e.task}" + (f" ({e.num_fewshot}-shot)" if e.num_fewshot else "")
                          for e in suite.spec.tasks)
        cap = f"at most {suite.spec.limit:,}" if suite.spec.limit else "all"
        rows.append((f"`{name}`", tasks, cap, "; ".join(m.split(":")[0] for m in suite.spec.missing)
                     or "-"))
    return rows


def markdown(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def catalog() -> str:
    rows, notes = task_rows()
    return markdown(rows) + "\n\n" + "\n".join(notes) + "\n\n" + markdown(suite_rows()) + "\n"
