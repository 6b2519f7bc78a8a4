"""``megasmol/eval/`` is layered: no module of it imports, directly or through others, a module
that imports it back (imports under ``if TYPE_CHECKING:`` do not count; imports inside functions
do). One formulation name is compared nowhere outside ``formulations/``, and both scorers are
``api.Scorer``s."""

import re
from pathlib import Path

from tests.test_layers import circles, module_graph

EVAL = Path(__file__).parents[1] / "megasmol" / "eval"


def test_the_eval_package_has_no_import_circle():
    """(The whole package's import graph and circle finder are tests/test_layers.py's.)"""
    graph = {m: [t for t in targets if t.startswith("megasmol.eval")]
             for m, targets in module_graph().items() if m.startswith("megasmol.eval")}
    assert "megasmol.eval.tasks.registry" in graph and "megasmol.eval.api" in graph
    assert circles(graph) == []
    # the check finds a circle when there is one
    graph["megasmol.eval.tasks.example"] = graph["megasmol.eval.tasks.example"] + ["megasmol.eval.api"]
    assert circles(graph)


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
