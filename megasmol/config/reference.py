"""The configuration reference, generated from the config dataclasses themselves: every section
and field of a run config with its type, default and docstring, so the documentation cannot
drift from the code. ``python -m megasmol.config.reference > docs/configuration.md``; a test
checks the committed file is current."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import sys
import textwrap
import typing
from functools import cache

HEADER = """# Run configuration reference

Generated from the config dataclasses' docstrings by `python -m megasmol.config.reference`
(a test keeps this file current). A run config is a YAML file with these sections; unknown keys,
wrong types and impossible combinations are refused before anything runs, naming the field.
`--set section.field=value` overrides a field from the command line. Fields typed "(path)" name a
file or folder: written in the file they are relative to it, given with `--set` relative to the
current directory. "(name or path)" fields take a built-in name, or a path where one exists.
"""


@cache
def field_docs(cls) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field of ``cls``."""
    source = textwrap.dedent(inspect.getsource(cls))
    body = ast.parse(source).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)):
            docs[node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _type_name(annotation) -> str:
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "").replace("|", "\\|")


def _type(field: dataclasses.Field) -> str:
    """The field's type, and whether it names a file or folder (``typed.PATH``: relative values
    from ``--set`` are taken from the current directory, from a config file from its folder)."""
    kind = {"path": " (path)", "name_or_path": " (name or path)"}.get(field.metadata.get("path"), "")
    return _type_name(field.type) + kind


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return f"`{field.default!r}`"
    if field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
        return "(section)" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


def _section(cls, hints) -> list:
    rows = []
    for field in dataclasses.fields(cls):
        if not field.init:
            continue
        hint = hints.get(field.name, field.type)
        rows.append((field.name, hint, field))
    return rows


def reference() -> str:
    from megasmol.config.run import RunConfig

    out = [HEADER]
    top_hints = typing.get_type_hints(RunConfig)
    top_docs = field_docs(RunConfig)
    sections, plain = [], []
    for name, hint, field in _section(RunConfig, top_hints):
        (sections if dataclasses.is_dataclass(hint) else plain).append((name, hint, field))
    out.append("## Top level\n\n| field | type | default | meaning |\n|---|---|---|---|")
    for name, _, field in plain:
        out.append(f"| `{name}` | {_type(field)} | {_default(field)} | {top_docs.get(name, '')} |")
    for name, hint, _ in sections:
        out.append(f"\n## `{name}`\n\n{top_docs.get(name, '')}\n")
        out.append("| field | type | default | meaning |\n|---|---|---|---|")
        out.extend(_rows(name, hint))
    return "\n".join(out) + "\n"


def _rows(prefix: str, cls) -> list:
    """One row per field of ``cls``, and the fields of a nested section after its own row."""
    rows = []
    docs = field_docs(cls)
    for sub_name, sub_hint, sub_field in _section(cls, typing.get_type_hints(cls)):
        rows.append(f"| `{prefix}.{sub_name}` | {_type(sub_field)} | {_default(sub_field)} | "
                    f"{docs.get(sub_name, '')} |")
        if dataclasses.is_dataclass(sub_hint):
            rows.extend(_rows(f"{prefix}.{sub_name}", sub_hint))
    return rows


if __name__ == "__main__":
    sys.stdout.write(reference())
