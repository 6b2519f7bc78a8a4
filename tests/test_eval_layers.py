"""``megasmol/eval/`` is layered: no module of it imports, directly or through others, a module
that imports it back (imports under ``if TYPE_CHECKING:`` do not count; imports inside functions
do). One formulation name is compared nowhere outside ``formulations/``, and both scorers are
``api.Scorer``s."""

import ast
import re
from pathlib import Path

EVAL = Path(__file__).parents[1] / "megasmol" / "eval"


def _module(path: Path) -> str:
    parts = path.relative_to(EVAL.parents[1]).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in EVAL.rglob("*.py")}

    def owner(name: str):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        edges = set()
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            edges |= {owner(t) for t in targets if owner(t) not in (None, name)}
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_eval_package_has_no_import_circle():
    graph = _graph()
    assert "megasmol.eval.tasks.registry" in graph and "megasmol.eval.api" in graph
    assert _cycles(graph) == []
    # the check finds a circle when there is one
    assert _cycles({**graph, "megasmol.eval.tasks.example": {"megasmol.eval.api"}})


def test_no_formulation_name_is_compared_outside_the_formulations():
    names = "|".join(["cf", "mcf", "bpb", "fg", "partial", "code", "requests"])
    compared = re.compile(rf"formulation\s*(==|!=|not in|in)\s*[(\[]?\s*[\"']({names})[\"']")
    offenders = [f"{path.relative_to(EVAL)}:{number}"
                 for path in EVAL.rglob("*.py") if "formulations" not in path.parts
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if compared.search(line)]
    assert offenders == []


def test_both_scorers_implement_the_scorer_protocol_with_keyword_constructors():
    import pytest

    from megasmol.eval.api import Scorer
    from megasmol.eval.scoring.parallel_scorer import PipelineScorer
    from megasmol.eval.scoring.scorers import ProcessScorer

    settings = dict(max_length=8, vocab_size=8, tokenizer=object(), name="t")
    one = ProcessScorer(hidden=lambda ids: ids, head=None, **settings)
    split = PipelineScorer(None, None, micro_batch_size=1, **settings)
    assert isinstance(one, Scorer) and isinstance(split, Scorer)
    assert not isinstance(object(), Scorer)
    with pytest.raises(TypeError):
        ProcessScorer(lambda ids: ids, None, 8, 8, object(), "t")  # keywords only
