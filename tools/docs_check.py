"""Run every command the README and docs/ show, as written, so none of them rots.

    python tools/docs_check.py                     # every page, in a fresh copy of the repository
    python tools/docs_check.py --list              # what would run, and what is left to a cluster
    python tools/docs_check.py --pages docs/data.md --keep /tmp/ws

Commands come from fenced ``bash`` / ``console`` / ``sh`` blocks (in ``console`` blocks, the
``$ `` lines; continuations joined). Pages run in the README's order in one workspace, a copy of
the tracked files with the current virtualenv linked as ``.venv`` and its ``bin`` first on PATH,
so a later page sees what an earlier one made (``make demo`` makes ``runs/demo``), as it would for
a reader who follows them in order. Each command runs with ``bash -eo pipefail`` in the workspace.

Not run here, each listed with its reason: lines for a cluster (``srun``, ``sbatch``, ``salloc``,
``ssh``, ``torchrun --nnodes N`` with N > 1, or an elided ``...``), and blocks preceded by
``<!-- docs-check: skip: REASON -->``. A block preceded by ``<!-- docs-check: output -->`` must
also print every output line it shows (``...`` lines stand for anything). Exit status 1 when a
command fails or a shown line is missing, naming the page and line.
"""

from __future__ import annotations

import argparse
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
         "docs/ablations.md", "docs/sft.md", "docs/preference.md", "docs/long-context.md",
         "docs/preflight.md", "docs/checkpoints.md", "docs/training-loop.md",
         "docs/configuration.md", "docs/tests.md", "examples/README.md"]
"""The README's reading order (its guide table); the check runs pages in this order."""
SHELLS = ("bash", "console", "sh", "shell")
CLUSTER_COMMANDS = ("srun", "sbatch", "salloc", "ssh", "mpirun")
_FENCE = re.compile(r"^```([A-Za-z]*)[^\n]*\n(.*?)^```", flags=re.M | re.S)
_MARK = re.compile(r"<!--\s*docs-check:\s*(skip|output)\s*:?\s*(.*?)\s*-->\s*\n\s*$")


@dataclass
class Command:
    page: str
    line: int
    text: str
    shown: list[str] = field(default_factory=list)
    """Output lines the page shows under the command (checked for ``output`` blocks)."""
    not_run: Optional[str] = None
    """Why the command is not run here (a cluster line or a skipped block)."""


@dataclass
class Block:
    page: str
    line: int
    language: str
    commands: list[Command]
    check_output: bool = False


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
        block = Block(page, start - 1, language, commands)
        if mark and mark.group(1) == "skip":
            reason = mark.group(2) or "skipped"
            for command in commands:
                command.not_run = command.not_run or reason
        elif mark:
            block.check_output = True
        blocks.append(block)
    return blocks


def page_blocks(pages: list[str]) -> list[Block]:
    return [block for page in pages for block in extract(page, (REPO / page).read_text())]


def prepare_workspace(directory: Path) -> Path:
    """A copy of the tracked files (modification times kept, so make sees an installed .venv as
    current) with the running interpreter's virtualenv linked as ``.venv``."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                             capture_output=True).stdout.decode().split("\0")
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


def _missing_lines(shown: list[str], output: str) -> list[str]:
    printed = {" ".join(line.split()) for line in output.splitlines()}
    return [line for line in shown
            if line != "..." and " ".join(line.split()) not in printed]


def run_command(command: Command, workspace: Path, env: dict, check_output: bool,
                timeout_s: float) -> Optional[str]:
    """Run one command line; returns None, or what went wrong."""
    script = command.text
    exporting = script.startswith("export ")
    if exporting:  # what a page exports stays set for its later commands
        script += '\nenv -0 > "$MEGASMOL_DOCS_ENV"'
        env["MEGASMOL_DOCS_ENV"] = str(workspace / ".docs-check-env")
    try:
        done = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=workspace, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"did not finish in {timeout_s:.0f} s"
    output = done.stdout + done.stderr
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
        missing = _missing_lines(command.shown, output)
        if missing:
            return "the page shows lines the command did not print:\n" + "\n".join(missing)
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
    parser.add_argument("--pages", nargs="+", default=PAGES, help="pages to run, in order "
                        "(default: all, in the README's order; later pages may need earlier ones)")
    parser.add_argument("--keep", type=Path, help="run in this directory and keep it (default: "
                        "a temporary copy of the repository, removed afterwards)")
    parser.add_argument("--list", action="store_true", help="list the commands, run nothing")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per command")
    args = parser.parse_args(argv)
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
