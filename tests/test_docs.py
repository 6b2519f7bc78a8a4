"""The documentation cannot drift: the configuration reference is generated from the config
dataclasses, the task catalog from the task definitions, every ``megasmol COMMAND`` the README
and docs/ name is a real command, and every ``megasmol`` command line in their code blocks parses
with the real CLI (its flags exist and its values are accepted)."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from megasmol.cli import build_parser
from megasmol.config.reference import field_docs, reference

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "README.md"]


def _load_docs_check():
    spec = importlib.util.spec_from_file_location("docs_check", REPO / "tools" / "docs_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


docs_check = _load_docs_check()


def _megasmol_lines(page: Path) -> list[str]:
    """The ``megasmol ...`` part of each command line the page's shell blocks show (pipes,
    redirections and ``&&`` chains cut off)."""
    out = []
    for block in docs_check.extract(str(page.relative_to(REPO)), page.read_text()):
        for command in block.commands:
            first = command.text.split("\n")[0]
            first = re.split(r"(?:^|\s)#", first)[0]
            found = re.search(r"(?:^|[\s;&(])(?:-m )?megasmol ([a-z].*)$", first)
            if found:
                out.append(re.split(r"\s+(?:\|\||&&|\||;|>)\s*", found.group(1))[0])
    return out


def test_the_configuration_reference_is_current():
    committed = (REPO / "docs" / "configuration.md").read_text()
    assert committed == reference(), "run: python -m megasmol.config.reference > docs/configuration.md"


def test_the_task_catalog_in_the_evaluation_guide_is_current():
    """docs/evaluation.md lists every built-in task and suite as `megasmol eval list` prints them
    (data source and version, split, size, chance), so a new task or split cannot go unlisted."""
    from megasmol.eval.catalog import catalog

    text = (REPO / "docs" / "evaluation.md").read_text()
    listed = text.split("<!-- megasmol eval list: start -->\n")[1]
    listed = listed.split("<!-- megasmol eval list: end -->")[0]
    assert listed == catalog(), "paste the output of `megasmol eval list` into docs/evaluation.md"


def test_every_config_field_has_a_docstring():
    import dataclasses
    import typing

    from megasmol.config.run import RunConfig

    missing = [name for name, _ in field_docs(RunConfig).items() if not _]
    hints = typing.get_type_hints(RunConfig)
    for field in dataclasses.fields(RunConfig):
        section = hints[field.name]
        if field.init and dataclasses.is_dataclass(section):
            documented = field_docs(section)
            missing += [f"{field.name}.{f.name}" for f in dataclasses.fields(section)
                        if f.init and not documented.get(f.name)]
        elif field.init and not field_docs(RunConfig).get(field.name):
            missing.append(field.name)
    assert not missing, missing


def test_every_command_the_docs_name_exists():
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 (argparse has no API)
    named = set()
    for doc in DOCS:
        text = doc.read_text()
        blocks = "\n".join(re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S))
        named |= set(re.findall(r"(?:^|[\s$])megasmol ([a-z][a-z-]+)", blocks, flags=re.M))
        named |= set(re.findall(r"`(?:[^`\n]*[\s(])?megasmol ([a-z][a-z-]+)[^`\n]*`", text))
    assert named and not named - commands, sorted(named - commands)


def test_every_command_line_in_the_docs_parses():
    parser = build_parser()
    lines = [(doc.name, line) for doc in DOCS for line in _megasmol_lines(doc)]
    assert len(lines) >= 15
    for where, line in lines:
        try:
            parser.parse_args(shlex.split(line))
        except SystemExit:
            pytest.fail(f"{where}: `megasmol {line}` does not parse (see the error above)")


def test_the_docs_check_runs_every_page_and_gives_each_skip_a_reason():
    """`make docs-check` runs every page this test reads, and what it does not run here names why
    (a cluster line, or a marked block)."""
    assert sorted(docs_check.PAGES) == sorted(str(doc.relative_to(REPO)) for doc in DOCS)
    commands = [c for block in docs_check.page_blocks(docs_check.PAGES) for c in block.commands]
    run = [c for c in commands if not c.not_run]
    assert len(run) >= 30, len(run)
    skipped = {c.text.split()[0]: c.not_run for c in commands if c.not_run}
    assert skipped.get("srun", "").startswith("needs a cluster"), skipped
    assert all(reason.strip() for reason in skipped.values())


def test_the_docs_check_runs_a_page_block_and_catches_what_it_does_not_print(tmp_path):
    """The planning block of the pretraining guide runs as written and prints every line the page
    shows; a shown line the command does not print (or a failing command) is a failure naming the
    page and line."""
    page = "docs/pretraining.md"
    blocks = [b for b in docs_check.page_blocks([page]) if b.check_output
              and b.commands[0].text.startswith("megasmol plan compute")]
    assert len(blocks) == 1 and len(blocks[0].commands) == 4
    assert docs_check.run_blocks(blocks, tmp_path, timeout_s=120, echo=lambda _: None) == []
    blocks[0].commands[0].shown.append("GPUs: 1 (the page lies)")
    blocks[0].commands[1].text = "megasmol plan hparams --flops"
    failures = docs_check.run_blocks(blocks, tmp_path, timeout_s=120, echo=lambda _: None)
    assert len(failures) == 2, failures
    assert failures[0].startswith(f"{page}:") and "GPUs: 1 (the page lies)" in failures[0]
    assert "exit status 2" in failures[1]
