"""data/chat and data/preference build on the shared layers (data/masked, data/messages) and never
on each other; the shared layers import neither."""

import ast
from pathlib import Path

import megasmol

DATA = Path(megasmol.__file__).parent / "data"
CHAT, PREFERENCE = "megasmol.data.chat", "megasmol.data.preference"
FORBIDDEN = {"chat": (PREFERENCE,), "preference": (CHAT,), "masked": (CHAT, PREFERENCE),
             "messages": (CHAT, PREFERENCE)}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def crossings(package: str) -> list[str]:
    out = []
    for path in sorted((DATA / package).rglob("*.py")):
        for module in sorted(imported_modules(path)):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package]):
                out.append(f"{path.relative_to(DATA.parent.parent)} imports {module}")
    return out


def test_chat_and_preference_never_import_each_other():
    for package in FORBIDDEN:
        assert (DATA / package).is_dir(), package
        assert crossings(package) == []


def test_the_check_sees_an_import_inside_a_function(tmp_path):
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from megasmol.data import preference\n"
                      "    import megasmol.data.chat.records\n")
    assert {"megasmol.data.preference", "megasmol.data.chat.records"} <= imported_modules(source)
