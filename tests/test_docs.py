"""The documentation cannot drift: the configuration reference is generated from the config
dataclasses, the task catalog from the task definitions, every ``megasmol COMMAND`` the README
and docs/ name is a real command, and every ``megasmol`` command line in their code blocks parses
with the real CLI (its flags exist and its values are accepted)."""

import re
import shlex
from pathlib import Path

import pytest

from megasmol.cli import build_parser
from megasmol.config.reference import field_docs, reference

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "examples" / "README.md"]


def _code_block_commands(text: str) -> list[str]:
    """``megasmol ...`` command lines of the fenced code blocks (continuations joined, prompts,
    comments, pipes and redirections stripped)."""
    out = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"(?:^|\s)#", line.strip().removeprefix("$ "))[0]
            found = re.search(r"(?:^|[\s;&(])(?:-m )?megasmol ([a-z].*)$", line)
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
    lines = [(doc.name, line) for doc in DOCS for line in _code_block_commands(doc.read_text())]
    assert len(lines) >= 15
    for where, line in lines:
        try:
            parser.parse_args(shlex.split(line))
        except SystemExit:
            pytest.fail(f"{where}: `megasmol {line}` does not parse (see the error above)")
