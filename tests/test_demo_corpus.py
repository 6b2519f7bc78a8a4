"""The embedded demo corpus: three real domains, deterministic, correct arithmetic."""

import ast
import json
import re

from megasmol.data.demo_corpus import build_demo_corpus, math_documents


def test_corpus_is_deterministic_and_multi_domain(tmp_path):
    first = build_demo_corpus(tmp_path / "a", code_mb=0.3, math_problems=200, seed=9)
    build_demo_corpus(tmp_path / "b", code_mb=0.3, math_problems=200, seed=9)
    for domain in ("prose", "code", "math"):
        a = (tmp_path / "a" / f"{domain}.jsonl").read_bytes()
        assert a == (tmp_path / "b" / f"{domain}.jsonl").read_bytes()
        assert first["domains"][domain]["documents"] > 0
    prose = [json.loads(line)["text"] for line in (tmp_path / "a" / "prose.jsonl").open()]
    code = [json.loads(line)["text"] for line in (tmp_path / "a" / "code.jsonl").open()]
    from pydoc_data.topics import topics

    assert topics["for"] in prose and any("Return" in p for p in prose)  # reference + docstrings
    for source in code:  # real Python source
        ast.parse(source)
    assert sum(len(c) for c in code) <= 300_000


def test_word_problem_answers_are_right():
    for problem in math_documents(300, seed=4):
        answer = int(re.search(r"The answer is (\d+)\.", problem).group(1))
        equations = re.findall(r"(\d+) ([-+*]) (\d+) = (\d+)", problem)
        assert equations or "remainder" in problem
        for a, op, b, result in equations:
            assert eval(f"{a} {op} {b}") == int(result)
        if "remainder" in problem:
            found = re.search(r"(\d+) / (\d+) = (\d+) with remainder (\d+)", problem)
            total, parts, q, r = map(int, found.groups())
            assert divmod(total, parts) == (q, r) and answer == q
