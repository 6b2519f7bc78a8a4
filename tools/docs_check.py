"""Run every command the README and docs/ show, as written, and compare the output they show.

    python tools/docs_check.py --set ci            # the fast pages: what `make test` runs (CI)
    python tools/docs_check.py --set release       # the rest: `make docs-check`, before each release
    python tools/docs_check.py                     # every page, in a fresh copy of the repository
    python tools/docs_check.py --list              # what would run, and what is left to a cluster
    python tools/docs_check.py --pages docs/data.md --keep /tmp/ws

Commands come from fenced ``bash`` / ``console`` / ``sh`` blocks (in ``console`` blocks, the
``$ `` lines; continuations joined). Pages run in the README's order in one workspace, a copy of
the work tree's files (tracked, and new ones git does not ignore) with the current virtualenv
linked as ``.venv`` and its ``bin`` first on PATH, so a later page sees what an earlier one made
(``make demo`` makes ``runs/demo``), as it would for a reader who follows them in order. Each
command runs with ``bash -eo pipefail`` in the workspace.

Shown output: in a ``console`` block, the lines under a ``$`` command are what it prints, stdout
and stderr together as a terminal shows them (a progress bar's last state), and the check
compares them with what it did print, every line and every figure: a command that prints more,
less or other lines than its page shows is a failure, and so is one that prints something where
the page shows nothing. Blank lines and runs of spaces do not count. A line ``...`` stands for
any number of printed lines (none included). The one tolerance is for what the machine measures
rather than what the program computes (a duration, a clock time, a speed, resident memory): a
figure written ``≈153s`` matches any figure in its place (``demo finished in ≈153s``, ``≈1.01
s/step``, ``≈13:39:53``, ``mem ≈0.8 GB``, a time stamp ``≈2026-12-03T13-44-02``); every other
figure must be printed exactly as shown. Each command's whole output is also kept in the
workspace, ``.docs-check/PAGE-LINE.out``, to update a page from (with ``--keep``).

Not run here, each listed with its reason: lines for a cluster (``srun``, ``sbatch``, ``salloc``,
``ssh``, ``torchrun --nnodes N`` with N > 1, or an elided ``...``), and blocks preceded by
``<!-- docs-check: skip: REASON -->``. Exit status 1 when a command fails or its output differs
from the page's, naming the page and line.

Two sets: ``CI_PAGES`` are self-contained and fast, and the test suite runs them
(``tests/test_docs_walkthroughs.py``, so CI does); the rest need the demo's runs or train for minutes, about
20 minutes on an idle 2-core machine (``make docs-check``, before each release).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/pretraining.md", "docs/data.md", "docs/evaluation.md",
         "docs/ablations.md", "docs/sft.md", "docs/preference.md", "docs/rl.md", "docs/long-context.md",
         "docs/preflight.md", "docs/checkpoints.md", "docs/training-loop.md", "docs/architecture.md",
         "docs/configuration.md", "docs/tests.md", "examples/README.md"]
"""The README's reading order (its guide table); the check runs pages in this order."""
CI_PAGES = ["docs/data.md"]
"""Pages that need nothing an earlier page made, run in about a minute and print the same on any
machine but for their measured figures: the test suite runs them (the planning block of the
pretraining guide runs there too, in ``tests/test_docs.py``). The others (the README's demos, the
guides that start from the demo's model, and pre-flight, whose verdicts depend on the machine's
speed) run before a release (``make docs-check``)."""
SETS = {"ci": CI_PAGES, "release": [page for page in PAGES if page not in CI_PAGES], "all": PAGES}
MEASURED = "\u2248"
"""The mark of a figure the machine measures (``≈``): it matches any figure in its place."""
_FIGURE = r"\d(?:[\w.,:-]*\w)?"
SHELLS = ("bash", "console", "sh", "shell")
CLUSTER_COMMANDS = ("srun", "sbatch", "salloc", "ssh", "mpirun")
_FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```", flags=re.M | re.S)
_MARK = re.compile(r"<!--\s*docs-check:\s*(skip)\s*:?\s*(.*?)\s*-->\s*\n\s*$")


@dataclass
class Command:
    page: str
    line: int
    text: str
    shown: list[str] = field(default_factory=list)
    """Output lines the page shows under the command (``console`` blocks), compared with its
    output."""
    not_run: Optional[str] = None
    """Why the command is not run here (a cluster line or a skipped block)."""


@dataclass
class Block:
    page: str
    line: int
    language: str
    commands: list[Command]
    check_output: bool = False
    """Whether the block shows output (``console``), compared with what its commands print."""


def _cluster_reason(text: str) -> Optional[str]:
    words = text.split()
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
        words = words[1:]  # VAR=value prefixes
    if words and words[0] in CLUSTER_COMMANDS:
        return f"needs a cluster ({words[0]})"
    nodes = re.search(r"--nnodes[ =](\S+)", text)
    if words and words[0] == "torchrun" and nodes and nodes.group(1) != "1":
        return f"needs a cluster (torchrun --nnodes {nodes.group(1)})"
    if re.search(r"(^|\s)\.\.\.(\s|$)", text):
        return "elided with '...'"
    return None


def _commands(page: str, start: int, language: str, body: str) -> list[Command]:
    """The command lines of one block (``start``: the page line of its first body line)."""
    out: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        raw, number = lines[i], start + i
        stripped = raw.strip()
        is_command = stripped.startswith("$ ") if language == "console" else bool(stripped)
        if not is_command or stripped.startswith("#"):
            if out and language == "console" and stripped:
                out[-1].shown.append(stripped)
            i += 1
            continue
        text = stripped.removeprefix("$ ") if language == "console" else stripped
        while text.endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text[:-1].rstrip() + " " + lines[i].strip()
        heredoc = re.search(r"<<-?\s*'?([A-Za-z_]+)'?", text)
        while heredoc and i + 1 < len(lines):  # a here-document belongs to its command
            i += 1
            text += "\n" + lines[i]
            if lines[i].strip() == heredoc.group(1):
                break
        out.append(Command(page, number, text, not_run=_cluster_reason(text)))
        i += 1
    return out


def extract(page: str, text: str) -> list[Block]:
    """Every shell block of a page with its command lines."""
    blocks = []
    for found in _FENCE.finditer(text):
        language = found.group(1).lower()
        if language not in SHELLS:
            continue
        before = text[:found.start()]
        start = before.count("\n") + 2
        commands = _commands(page, start, language, found.group(2))
        mark = _MARK.search(before[-300:])
        block = Block(page, start - 1, language, commands, check_output=language == "console")
        if mark:
            reason = mark.group(2) or "skipped"
            for command in commands:
                command.not_run = command.not_run or reason
        blocks.append(block)
    return blocks


def page_blocks(pages: list[str]) -> list[Block]:
    return [block for page in pages for block in extract(page, (REPO / page).read_text())]


def prepare_workspace(directory: Path) -> Path:
    """A copy of the repository's files as they are in the work tree, tracked and new ones git
    does not ignore (modification times kept, so make sees an installed .venv as current), with
    the running interpreter's virtualenv linked as ``.venv``."""
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             cwd=REPO, check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        source, target = REPO / name, directory / name
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    if sys.prefix != sys.base_prefix and not (directory / ".venv").exists():
        (directory / ".venv").symlink_to(sys.prefix)
    return directory


def environment(workspace: Path) -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _printed_lines(output: str) -> list[str]:
    """The lines a terminal would show (a carriage return redraws its line), blank ones left
    out, runs of whitespace made one space."""
    lines = (line.rstrip("\r").split("\r")[-1] for line in output.split("\n"))
    return [" ".join(line.split()) for line in lines if line.strip()]


def _line_pattern(shown: str) -> re.Pattern:
    """A shown line as a pattern: its text exactly (spaces collapsed), each ``≈`` figure any
    figure."""
    parts = re.split(f"{MEASURED}({_FIGURE})", " ".join(shown.split()))
    return re.compile("".join(re.escape(part) if i % 2 == 0 else _FIGURE
                              for i, part in enumerate(parts)))


def _at(patterns: list[re.Pattern], printed: list[str], start: int) -> bool:
    return start + len(patterns) <= len(printed) and all(
        pattern.fullmatch(printed[start + i]) for i, pattern in enumerate(patterns))


def output_differences(shown: list[str], output: str) -> Optional[str]:
    """None when ``output`` prints the shown lines (``...``: any lines), else what differs."""
    printed = _printed_lines(output)
    shown = [line for line in shown if line.strip()]
    runs: list[list[str]] = [[]]
    for line in shown:
        if line.strip() == "...":
            runs.append([])
        else:
            runs[-1].append(line)
    patterns = [[_line_pattern(line) for line in run] for run in runs]
    position, failed = 0, None
    for index, run in enumerate(patterns):
        first, last = index == 0, index == len(patterns) - 1
        if first and last:
            where = 0 if len(run) == len(printed) and _at(run, printed, 0) else None
        elif first:
            where = 0 if _at(run, printed, 0) else None
        elif last:
            where = len(printed) - len(run)
            where = where if where >= position and _at(run, printed, where) else None
        else:
            where = next((i for i in range(position, len(printed) - len(run) + 1)
                          if _at(run, printed, i)), None)
        if where is None:
            failed = runs[index]
            break
        position = where + len(run)
    if failed is None:
        return None
    if not shown:
        return "the page shows no output; the command printed:\n" + "\n".join(printed[:20])
    report = []
    for line in failed:
        pattern = _line_pattern(line)
        if not any(pattern.fullmatch(p) for p in printed):
            close = difflib.get_close_matches(" ".join(line.split()), printed, n=1, cutoff=0.5)
            nearest = close[0] if close else "(nothing like it)"
            report.append(f"  page:    {line.strip()}\n  printed: {nearest}")
    if not report:  # every line was printed, but not in the page's order or with more around it
        report.append("  the shown lines are printed, but not as shown (their order, or other lines "
                      "between, before or after them: `...` stands for those)")
    return "\n".join(report)


def run_command(command: Command, workspace: Path, env: dict, check_output: bool,
                timeout_s: float) -> Optional[str]:
    """Run one command line; returns None, or what went wrong."""
    script = command.text
    exporting = script.startswith("export ")
    if exporting:  # what a page exports stays set for its later commands
        script += '\nenv -0 > "$MEGASMOL_DOCS_ENV"'
        env["MEGASMOL_DOCS_ENV"] = str(workspace / ".docs-check-env")
    try:  # stdout and stderr in one stream, in the order a terminal shows them
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=workspace,
                              env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout_s:.0f} s"
    output = done.stdout
    kept = workspace / ".docs-check" / f"{command.page.replace('/', '-')}-{command.line}.out"
    kept.parent.mkdir(exist_ok=True)
    kept.write_text(output)
    if exporting and done.returncode == 0:
        exported = Path(env.pop("MEGASMOL_DOCS_ENV"))
        env.clear()
        env.update(item.split("=", 1) for item in exported.read_text().split("\0") if "=" in item)
        env.pop("MEGASMOL_DOCS_ENV", None)
        exported.unlink()
    if done.returncode != 0:
        tail = "\n".join(output.splitlines()[-15:])
        return f"exit status {done.returncode}:\n{tail}"
    if check_output:
        differences = output_differences(command.shown, output)
        if differences:
            return (f"the output differs from the page's (all of it: {kept.relative_to(workspace)} "
                    f"in the workspace):\n{differences}")
    return None


def run_blocks(blocks: list[Block], workspace: Path, timeout_s: float = 1800.0,
               echo=print) -> list[str]:
    """Run the blocks' commands in order; returns one message per failure."""
    failures = []
    env_by_page: dict[str, dict] = {}
    for block in blocks:
        env = env_by_page.setdefault(block.page, environment(workspace))
        for command in block.commands:
            where = f"{command.page}:{command.line}"
            if command.not_run:
                echo(f"  not run  {where}  {command.text.splitlines()[0][:70]}  ({command.not_run})")
                continue
            start = time.monotonic()
            problem = run_command(command, workspace, env, block.check_output, timeout_s)
            took = time.monotonic() - start
            status = "ok" if problem is None else "FAILED"
            echo(f"  {status:7s}  {where}  {command.text.splitlines()[0][:70]}  ({took:.0f} s)")
            if problem:
                failures.append(f"{where}: `{command.text}`: {problem}")
    return failures


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", nargs="+", help="pages to run, in order (default: the set's, "
                        "in the README's order; later pages may need earlier ones)")
    parser.add_argument("--set", choices=sorted(SETS), default="all",
                        help="ci: the fast, self-contained pages the test suite runs; release: the "
                             "rest (make docs-check); all (default): every page")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: "
                        "a temporary copy of the repository, removed afterwards)")
    parser.add_argument("--list", action="store_true", help="list the commands, run nothing")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    args = parser.parse_args(argv)
    args.pages = args.pages or SETS[args.set]
    missing = [page for page in args.pages if not (REPO / page).is_file()]
    if missing:
        parser.error(f"no such page: {', '.join(missing)}")
    blocks = page_blocks(args.pages)
    commands = [command for block in blocks for command in block.commands]
    if args.list:
        for command in commands:
            print(f"{'not run' if command.not_run else 'run':7s}  {command.page}:{command.line}  "
                  f"{command.text}" + (f"  ({command.not_run})" if command.not_run else ""))
        return 0
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="megasmol-docs-") as scratch:
        workspace = args.keep or Path(scratch)
        workspace.mkdir(parents=True, exist_ok=True)
        prepare_workspace(workspace)
        print(f"docs check: {sum(not c.not_run for c in commands)} commands from "
              f"{len(args.pages)} page(s) in {workspace}", flush=True)
        failures = run_blocks(blocks, workspace, args.timeout,
                              echo=lambda line: print(line, flush=True))
    print(f"docs check: {len(failures)} failure(s) in {time.monotonic() - started:.0f} s")
    for failure in failures:
        print(f"\n{failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
