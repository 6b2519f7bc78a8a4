"""``checkpoint.post_save_command``'s template: how the checkpoint reaches the user's command, and
the rules that keep its path from becoming code, checked when the config is loaded. (Running it
on each committed checkpoint is the training loop's ``train/callbacks/post_save.py``.)

The checkpoint's path and step reach the command as the environment variables
``MEGASMOL_CHECKPOINT`` and ``MEGASMOL_STEP``. The ``{path}`` and ``{step}`` placeholders are
rewritten into references to those variables, quoted for where they stand (bare, inside
``"..."`` or inside ``'...'``): the shell that runs the command always sees the path as one word.
A command can still hand the expanded path to a second shell that parses it again (``bash -c
'...'``, ``sh -c "..."``, ``eval``, ``sbatch --wrap``, ``ssh host '...'``), so the checkpoint
directory of a run with a post-save command may only hold characters that no shell treats
specially: letters of any script, digits and ``._/+=@%:,~-`` (a non-ASCII character is made of
bytes above 127, which no shell reads as syntax). Then no template, however nested, can turn the
path into code. A space cannot become code either, but a second shell would split the path at
it: spaces are allowed unless the command names such a shell. Both rules, and the template's
quoting, are checked when the config is loaded, before anything runs.
"""

from __future__ import annotations

import re
import shlex
import unicodedata
from pathlib import Path
from typing import Optional

PLACEHOLDERS = {"{path}": "MEGASMOL_CHECKPOINT", "{step}": "MEGASMOL_STEP"}
SHELL_INERT = re.compile(r"[A-Za-z0-9._/+=@%:,~-]*")
SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "fish", "csh", "tcsh", "busybox",
          "$SHELL", "${SHELL}"}
"""Programs that parse a ``-c`` argument as shell code."""
TAKES_C = {"flock", "script", "su", "runuser"}
"""Programs whose ``-c`` argument is a command line for a shell."""
REPARSERS = {"eval", "ssh", "watch", "pdsh", "clush", "xargs"}
"""Programs that join their arguments into a command line for a shell (or split input at spaces)."""


def _inert(char: str) -> bool:
    """No shell reads ``char`` as syntax: ASCII letters, digits and ``._/+=@%:,~-``, and the
    letters, marks and digits of other scripts (all their UTF-8 bytes are above 127)."""
    if char.isascii():
        return bool(SHELL_INERT.fullmatch(char))
    return unicodedata.category(char)[0] in "LMN"


def nested_shell(template: str) -> Optional[str]:
    """The words of ``template`` that hand a command line to a second shell (``bash -c``,
    ``eval``, ``ssh``, ``sbatch --wrap``...), or None when it names none of them."""
    lexer = shlex.shlex(template, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    command: list[str] = []
    for word in [*lexer, ";"]:
        if word and set(word) <= set("();<>|&"):  # the end of a simple command
            command = []
            continue
        name = word.rsplit("/", 1)[-1]
        if name in REPARSERS or word.startswith("--wrap"):
            return word.split("=", 1)[0]
        if re.fullmatch(r"-[A-Za-z]*c[A-Za-z]*", word):
            starter = next((w for w in command if w.rsplit("/", 1)[-1] in SHELLS | TAKES_C), None)
            if starter is not None:
                return f"{starter} {word}"
        command.append(word)
    return None


def check_command(template: str, checkpoint_dir: Path) -> None:
    """Refuse, once and before training, a template the shell cannot parse and a checkpoint
    directory whose path a nested shell could read as code or split into words."""
    from megasmol.config.typed import ConfigError

    try:
        shlex.split(shell_line(template))
    except ValueError as exc:
        raise ConfigError(f"checkpoint.post_save_command: {exc} in {template!r}") from None
    path = str(checkpoint_dir)
    odd = sorted({c for c in path if not _inert(c) and c != " "})
    if odd:
        raise ConfigError(
            f"checkpoint.dir {path!r} holds {' '.join(repr(c) for c in odd)}: with a "
            "post_save_command, the checkpoint path may only hold letters, digits, spaces and "
            "._/+=@%:,~- (a command that passes it to another shell would run the rest as code); "
            "choose another checkpoint.dir (--set checkpoint.dir=...)")
    nested = nested_shell(template) if " " in path else None
    if nested is not None:
        raise ConfigError(
            f"checkpoint.dir {path!r} holds ' ': checkpoint.post_save_command hands the path to "
            f"another shell ({nested}), which would split it into words at each space; choose a "
            "checkpoint.dir without spaces, or have the command run a script that takes {path} as "
            "one argument")


def shell_line(template: str) -> str:
    """``template`` with each placeholder replaced by a quoted variable reference."""
    out, i, quote = [], 0, None  # quote: None, "'" or '"'
    while i < len(template):
        hit = next((p for p in PLACEHOLDERS if template.startswith(p, i)), None)
        if hit is not None:
            var = "${" + PLACEHOLDERS[hit] + "}"
            out.append({None: f'"{var}"', '"': var, "'": f"'\"{var}\"'"}[quote])
            i += len(hit)
            continue
        char = template[i]
        if char == "\\" and quote != "'" and i + 1 < len(template):
            out.append(template[i:i + 2])
            i += 2
            continue
        if char in "'\"" and quote in (None, char):
            quote = None if quote == char else char
        out.append(char)
        i += 1
    return "".join(out)


def command_env(path: Path, step: int) -> dict[str, str]:
    """The variables the placeholders of ``shell_line`` refer to, for the checkpoint ``path``."""
    return {PLACEHOLDERS["{path}"]: str(path), PLACEHOLDERS["{step}"]: str(step)}
