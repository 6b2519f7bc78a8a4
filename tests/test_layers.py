"""The package's layering, read from the code: which room may import which, no import circles, no
private name imported across files. The rules are in docs/architecture.md; the known exceptions
are listed here explicitly, and a listed exception that no longer exists fails too, so the lists
can only shrink."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megasmol"

LAYERS = [
    ["errors"], ["utils"], ["megasmol"], ["config"], ["runtime", "tokenizer"], ["model"], ["data"],
    ["ckpt"], ["decode", "convert"], ["longctx"], ["eval"], ["rl"], ["train"], ["demo", "preflight"],
    ["chat", "ablate", "plan"], ["cli"], ["__main__"],
]
"""Rooms from the bottom up (``megasmol`` is the package's own ``__init__``). A room imports only
rooms in lower layers; rooms in one layer do not import each other. Imports under
``if TYPE_CHECKING:`` are annotations, not dependencies, and are not counted."""

LAYERING_EXCEPTIONS = {
    # The checkpoint's identity file is read below the checkpoint room.
    ("megasmol.data.masked.publish", "megasmol.ckpt.checkpoint"),
    ("megasmol.data.messages.special_tokens", "megasmol.ckpt.checkpoint"),
    ("megasmol.model.init", "megasmol.ckpt.checkpoint"),
    ("megasmol.model.load", "megasmol.ckpt.checkpoint"),
    ("megasmol.model.load", "megasmol.ckpt.reader"),
    ("megasmol.model.spec", "megasmol.ckpt.checkpoint"),
    ("megasmol.model.run_spec", "megasmol.ckpt.branch"),
    # Typed YAML loading lives in config.
    ("megasmol.utils.hub", "megasmol.config.typed"),
    ("megasmol.utils.jsonl", "megasmol.config.typed"),
}
"""(importer, imported) pairs that break the layering today."""

CIRCLE_EXCEPTIONS = [
    {"megasmol.ckpt.checkpoint", "megasmol.ckpt.storage"},
    {"megasmol.preflight.dcgm", "megasmol.preflight.dcgm_bindings"},
]
"""Import circles (strongly connected modules) that exist today."""

PRIVATE_EXCEPTIONS = {
    ("megasmol.preflight.collectives", "megasmol.preflight.compute._sync"),
    ("megasmol.train.reference", "megasmol.data.loader._collate"),
}
"""(importer, imported module + private name) pairs that exist today."""


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(inner) for statement in node.body for inner in ast.walk(statement))
    return skip


def _imports(module: str, source: str | None = None) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for each megasmol import in ``module`` (its file,
    or ``source``), function-level imports included (a lazy import is still a dependency)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skip = _type_checking_nodes(tree)
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.split(".")[0] == "megasmol"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "megasmol":
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (target, alias.name))
    return found


GRAPH = {module: _imports(module) for module in MODULES}


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "megasmol"


RANK = {room: i for i, layer in enumerate(LAYERS) for room in layer}


def test_every_room_has_a_layer():
    rooms = {_room(m) for m in MODULES}
    assert rooms <= set(RANK), f"add these rooms to LAYERS (and docs/architecture.md): {rooms - set(RANK)}"


def _against_layers(graph: dict) -> set[tuple[str, str]]:
    broken = set()
    for module, imports in graph.items():
        for target, _ in imports:
            room, other = _room(module), _room(target)
            if room != other and RANK[other] >= RANK[room]:
                broken.add((module, target))
    return broken


def test_rooms_import_only_lower_layers():
    broken = _against_layers(GRAPH)
    new = sorted(broken - LAYERING_EXCEPTIONS)
    assert not new, "imports against the layering (docs/architecture.md):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in new)
    gone = sorted(LAYERING_EXCEPTIONS - broken)
    assert not gone, f"fixed, so remove from LAYERING_EXCEPTIONS: {gone}"


def test_the_named_rules_hold_without_exception():
    """The rules the issue tracker and the docs name: config describes (imports only config,
    errors and utils), evaluation and checkpoints never reach into training."""
    rules = {"eval": {"train"}, "ckpt": {"train", "eval"}, "model": {"train", "eval", "data"},
             "runtime": {"model", "data", "train", "eval", "ckpt"}}
    for module, imports in GRAPH.items():
        for target, _ in imports:
            assert _room(target) not in rules.get(_room(module), set()), f"{module} imports {target}"


def module_graph() -> dict[str, list[str]]:
    """Each megasmol module and the megasmol modules it imports (annotation-only imports aside)."""
    return {m: sorted({t for t, _ in GRAPH[m] if t in MODULES and t != m}) for m in MODULES}


def circles(graph: dict[str, list[str]]) -> list[set[str]]:
    """Strongly connected groups of two or more modules (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(graph[start]))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        found.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(graph[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circles():
    found = circles(module_graph())
    new = [sorted(c) for c in found if c not in CIRCLE_EXCEPTIONS]
    assert not new, f"import circles: {new}"
    gone = [sorted(c) for c in CIRCLE_EXCEPTIONS if c not in found]
    assert not gone, f"broken up (or changed), so update CIRCLE_EXCEPTIONS: {gone}"


def test_no_private_name_is_imported_from_another_file():
    found = set()
    for module, imports in GRAPH.items():
        for target, name in imports:
            if name and name.startswith("_") and not name.startswith("__") and target != module:
                found.add((module, f"{target}.{name}"))
    new = sorted(found - PRIVATE_EXCEPTIONS)
    assert not new, f"private names imported across files (make them public or move them): {new}"
    gone = sorted(PRIVATE_EXCEPTIONS - found)
    assert not gone, f"fixed, so remove from PRIVATE_EXCEPTIONS: {gone}"


def test_the_checker_sees_upward_lazy_and_relative_imports_but_not_annotations():
    """The graph is read from the code: an upward import written into a module is found, inside a
    function and as a relative import too; one under ``if TYPE_CHECKING:`` is not."""
    module = "megasmol.config.schedule"
    source = (MODULES[module].read_text()
              + "\ndef late():\n    from megasmol.train import loop\n"
              + "from ..eval import api_that_does_not_exist\n"
              + "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megasmol.ablate import grid\n")
    graph = {**GRAPH, module: _imports(module, source)}
    added = _against_layers(graph) - _against_layers(GRAPH)
    assert added == {(module, "megasmol.train.loop"), (module, "megasmol.eval")}
