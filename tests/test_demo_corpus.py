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


def test_the_stdlib_docstrings_are_parsed_once_and_a_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    from megasmol.data import demo_corpus

    monkeypatch.setenv(demo_corpus.CACHE_ENV, str(tmp_path))
    parsed = []
    real_parse = demo_corpus._parse_docstrings
    monkeypatch.setattr(demo_corpus, "_parse_docstrings",
                        lambda sources: parsed.append(1) or real_parse(sources))

    def fresh():
        demo_corpus.stdlib_docstrings.cache_clear()
        return demo_corpus.stdlib_docstrings()

    first = fresh()
    (cached,) = (tmp_path / "stdlib-docstrings").glob("*.json")
    assert len(first) > 1000 and parsed == [1]
    assert fresh() == first and parsed == [1]  # read from the cache, not parsed again
    cached.write_text('["cut short')  # a damaged file: parsed again, and replaced
    assert fresh() == first and parsed == [1, 1]
    assert fresh() == first and parsed == [1, 1]
    assert not list(tmp_path.rglob("*.partial"))
    demo_corpus.stdlib_docstrings.cache_clear()


def test_corpus_sizes_that_cannot_be_built_are_refused_in_one_line(tmp_path):
    """``demo-corpus`` (and ``demo``, the same type) refuses a code budget of 0, below 0, NaN or
    infinite, and a problem count below 1, naming the option, before writing anything."""
    from tests.conftest import cli_in_process

    for option, raw, said in [("--code-mb", "0", "must be above 0, got 0"),
                              ("--code-mb", "-1", "must be above 0, got -1"),
                              ("--code-mb", "nan", "must be above 0, got nan"),
                              ("--code-mb", "inf", "must be a finite number, got inf"),
                              ("--math-problems", "0", "")]:
        out = tmp_path / "corpus"
        proc = cli_in_process("demo-corpus", "--out", str(out), option, raw)
        assert proc.returncode == 2 and f"argument {option}: {said}" in proc.stderr, (option, raw)
        assert not out.exists()
    proc = cli_in_process("demo", "--code-mb", "inf")
    assert proc.returncode == 2 and "argument --code-mb: must be a finite number, got inf" in proc.stderr
