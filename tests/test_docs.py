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
    from megasmol.eval.tasks.catalog import catalog

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
    """The docs check runs every page this test reads, each in one of its two sets (the fast
    pages in the test suite, the rest with `make docs-check`), and what it does not run here
    names why (a cluster line, or a marked block)."""
    assert sorted(docs_check.PAGES) == sorted(str(doc.relative_to(REPO)) for doc in DOCS)
    ci, release = docs_check.SETS["ci"], docs_check.SETS["release"]
    assert not set(ci) & set(release) and sorted(ci + release) == sorted(docs_check.PAGES)
    assert "README.md" in release and "docs/data.md" in ci
    commands = [c for block in docs_check.page_blocks(docs_check.PAGES) for c in block.commands]
    run = [c for c in commands if not c.not_run]
    assert len(run) >= 30, len(run)
    skipped = {c.text.split()[0]: c.not_run for c in commands if c.not_run}
    assert skipped.get("srun", "").startswith("needs a cluster"), skipped
    assert all(reason.strip() for reason in skipped.values())


def test_the_docs_check_runs_a_page_block_and_catches_what_it_does_not_print(tmp_path):
    """The planning block of the pretraining guide runs as written and prints exactly what the
    page shows; a shown line the command does not print, a figure changed by one digit, a line the
    page does not show, or a failing command is a failure naming the page and line."""
    page = "docs/pretraining.md"
    blocks = [b for b in docs_check.page_blocks([page]) if b.check_output
              and b.commands[0].text.startswith("megasmol plan compute")]
    assert len(blocks) == 1 and len(blocks[0].commands) == 4
    assert docs_check.run_blocks(blocks, tmp_path, timeout_s=120, echo=lambda _: None) == []
    compute, hparams, rule, layout = blocks[0].commands
    compute.shown.append("GPUs: 1 (the page lies)")
    hparams.shown = [line.replace("7.394e-04", "7.395e-04") for line in hparams.shown]
    assert len(rule.shown) >= 1
    rule.shown = rule.shown[:-1]  # the command prints a line the page no longer shows
    layout.text = "megasmol plan hparams --flops"
    failures = docs_check.run_blocks(blocks, tmp_path, timeout_s=120, echo=lambda _: None)
    assert len(failures) == 4, failures
    assert all(failure.startswith(f"{page}:") for failure in failures)
    assert "GPUs: 1 (the page lies)" in failures[0]
    assert "page:    learning rate" in failures[1] and "7.394e-04" in failures[1]
    assert "not as shown" in failures[2]
    assert "exit status 2" in failures[3]


def test_shown_output_is_compared_line_for_line_with_a_tolerance_only_for_measured_figures():
    printed = ("02:08:17 step 20/40 | loss 9.3647 | 1.5k tok/s | 0.67 s/step | mem 0.9 GB\n"
               "saved checkpoint runs/crash/checkpoints/iter_0000020 (0.8s)\n"
               "export: 10%\rexport: 100%\n\n")
    differs = docs_check.output_differences
    shown = ["≈01:43:14 step 20/40 | loss 9.3647 | ≈1.6k tok/s | ≈0.65 s/step | mem ≈0.8 GB",
             "saved checkpoint runs/crash/checkpoints/iter_0000020  (≈12.5s)", "export: 100%"]
    assert differs(shown, printed) is None
    assert differs([shown[0], "..."], printed) is None and differs(["...", shown[2]], printed) is None
    assert differs([shown[0], "...", shown[2]], printed) is None
    assert "9.3648" in differs([shown[0].replace("9.3647", "9.3648"), "..."], printed)
    assert "not as shown" in differs(shown[:2], printed)  # a printed line the page leaves out
    assert "not as shown" in differs([shown[1], shown[0], "..."], printed)
    assert "shows no output" in differs([], printed) and differs([], "\n") is None
    # a figure printed by the program (not measured) is never a wildcard, even after a '~'
    assert differs(["chance: ~0% for a 5-digit key"], "chance: ~0% for a 5-digit key") is None
    assert differs(["chance: ~0% for a 5-digit key"], "chance: ~1% for a 5-digit key") is not None


_MEASURE = re.compile(
    r"≈(?:\d+:\d\d:\d\d"  # a clock time
    r"|\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d"  # a time stamp
    r"|\d+m\d+s|[\d.]+m?s\b"  # a duration
    r"|[\d.,]+k?(?: ?(?:s/step|tok/s|GB/s|TFLOP/s|GB|s\b|/dev\))))"  # with its unit
    r"|(?<=(?:min|std) )≈[\d.]+|(?<=torch\.matmul )≈[\d.]+"  # a measurement's spread, a baseline
    r"|(?<=gen )≈\d+%")  # the share of an RL step's time spent generating


def test_only_measured_figures_carry_the_tolerance_mark():
    """`≈` (any figure matches) marks only what the machine measures: a duration, a clock time, a
    speed or resident memory, each with its unit (or in a column of speeds). Every other figure in
    shown output is compared as printed."""
    marked = []
    for doc in DOCS:
        for block in docs_check.extract(str(doc.relative_to(REPO)), doc.read_text()):
            for command in block.commands:
                for index, line in enumerate(command.shown):
                    for found in re.finditer("≈", line):
                        marked.append(line)
                        if _MEASURE.match(line, found.start()) or _in_a_speed_column(
                                command.shown[:index], line, found.start()):
                            continue
                        pytest.fail(f"{doc.name}: `≈` on a figure that is not a measurement: {line}")
    assert len(marked) >= 20


def _in_a_speed_column(above: list[str], line: str, column: int) -> bool:
    """Whether ``column`` of a table row falls under a header naming a speed (``tokens/s``)."""
    headers = [h for h, rule in zip(above, above[1:]) if set(rule.replace(" ", "")) == {"-"}]
    return bool(headers) and any(match.start() <= column + 1 <= match.end() + 2
                                 for match in re.finditer(r"\S*/s\b", headers[-1]))
