"""A small, real, multi-domain corpus built from what every Python installation ships.

- prose: the language reference topics in ``pydoc_data`` and the longer docstrings of the
  standard library (English technical writing);
- code: standard-library source files, a seeded sample up to a size budget;
- math: seeded arithmetic word problems with worked solutions.

Nothing is downloaded and the output is deterministic for a given Python version, so the demo
and the tests train on the same bytes everywhere.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

DOMAINS = ("prose", "code", "math")
MIN_DOCSTRING_CHARS = 300


@dataclass(frozen=True)
class DemoCorpus:
    root: Path

    def jsonl(self, domain: str) -> Path:
        return self.root / f"{domain}.jsonl"

    def prefix(self, domain: str) -> Path:
        return self.root / "tokens" / f"{domain}_text_document"


def stdlib_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(p for p in stdlib.rglob("*.py") if not skipped & set(p.relative_to(stdlib).parts))


CACHE_ENV = "MEGASMOL_CACHE"
"""Where derived data that is costly to rebuild is kept (default ``$XDG_CACHE_HOME/megasmol`` or
``~/.cache/megasmol``); deleting it only costs the time to rebuild."""


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get(CACHE_ENV) or Path(base) / "megasmol").expanduser()


def _parse_docstrings(sources: list[Path]) -> list[str]:
    found = []
    for path in sources:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree)
                          if isinstance(n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        found += [doc for doc in map(ast.get_docstring, nodes) if doc]
    return found


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Every module, class and function docstring of the standard library, in source order.

    Parsing the whole standard library costs about 4 s of CPU, and every process that builds the
    demo corpus or its held-out tasks needs it, so the result is kept in :func:`cache_dir`, under
    a key of the Python version and each source file's path, size and modification time (a
    changed standard library is parsed again). An unreadable or damaged cache file is parsed
    again and replaced; a cache folder that cannot be written is only not used."""
    sources = stdlib_sources()
    key = hashlib.sha256("\n".join([sys.version] + [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
                                                       for p in sources]).encode()).hexdigest()[:20]
    cached = cache_dir() / "stdlib-docstrings" / f"{key}.json"
    try:
        docs = json.loads(cached.read_text(encoding="utf-8"))
        if isinstance(docs, list) and all(isinstance(d, str) for d in docs):
            return tuple(docs)
    except (OSError, ValueError):
        pass
    docs = _parse_docstrings(sources)
    partial = cached.with_name(f"{cached.name}.{os.getpid()}.partial")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(partial, cached)
    except OSError:
        partial.unlink(missing_ok=True)
    return tuple(docs)


def prose_documents() -> list[str]:
    from pydoc_data.topics import topics

    documents = [topics[name] for name in sorted(topics)]
    return documents + [doc for doc in stdlib_docstrings() if len(doc) >= MIN_DOCSTRING_CHARS]


def code_documents(budget_bytes: int, seed: int) -> list[str]:
    paths = stdlib_sources()
    random.Random(seed).shuffle(paths)
    documents, used = [], 0
    for path in paths:
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip() or used + len(text) > budget_bytes:
            continue
        documents.append(text)
        used += len(text)
    return documents


_NAMES = ["Ava", "Ben", "Chloe", "Diego", "Emma", "Farah", "Gus", "Hana", "Ivan", "Jade", "Kofi",
          "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sami", "Tara"]
_ITEMS = [("apples", "basket"), ("pencils", "box"), ("stickers", "sheet"), ("marbles", "bag"),
          ("cookies", "tray"), ("books", "shelf"), ("stamps", "album"), ("eggs", "carton")]


def math_problem(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    item, container = rng.choice(_ITEMS)
    kind = rng.randrange(5)
    if kind == 0:
        a, b, c = rng.randint(5, 90), rng.randint(2, 9), rng.randint(3, 15)
        total = a + b * c
        return (f"Question: {name} has {a} {item}. {name} buys {b} {container}s with {c} {item} in "
                f"each {container}. How many {item} does {name} have now?\n"
                f"Answer: {b} {container}s hold {b} * {c} = {b * c} {item}. "
                f"{a} + {b * c} = {total}. The answer is {total}.")
    if kind == 1:
        b, c = rng.randint(2, 12), rng.randint(2, 12)
        total = b * c + rng.randint(0, b - 1)
        q, r = divmod(total, b)
        return (f"Question: {name} shares {total} {item} equally among {b} friends. How many {item} "
                f"does each friend get, and how many are left over?\n"
                f"Answer: {total} / {b} = {q} with remainder {r}. Each friend gets {q} {item} and "
                f"{r} are left over. The answer is {q}.")
    if kind == 2:
        price, count, paid = rng.randint(2, 40), rng.randint(2, 9), 0
        cost = price * count
        paid = cost + rng.randint(1, 50)
        return (f"Question: One {container} of {item} costs {price} dollars. {name} buys {count} of "
                f"them and pays with {paid} dollars. How much change does {name} get?\n"
                f"Answer: The cost is {count} * {price} = {cost} dollars. The change is "
                f"{paid} - {cost} = {paid - cost} dollars. The answer is {paid - cost}.")
    if kind == 3:
        a, b = rng.randint(10, 500), rng.randint(10, 500)
        give = rng.randint(1, min(a, b))
        return (f"Question: {name} has {a} {item} and {other} has {b} {item}. {name} gives {give} "
                f"{item} to {other}. How many {item} do they have together?\n"
                f"Answer: Giving does not change the total: {a} + {b} = {a + b}. "
                f"The answer is {a + b}.")
    speed, hours = rng.randint(20, 120), rng.randint(2, 9)
    extra = rng.randint(5, 60)
    distance = speed * hours + extra
    return (f"Question: A train travels at {speed} km per hour for {hours} hours, then {extra} km "
            f"more. How far does it travel in total?\n"
            f"Answer: {speed} * {hours} = {speed * hours} km, and {speed * hours} + {extra} = "
            f"{distance} km. The answer is {distance}.")


def math_documents(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [math_problem(rng) for _ in range(count)]


def build_demo_corpus(out_dir: str | Path, code_mb: float = 3.0, math_problems: int = 20000,
                      seed: int = 1234) -> dict:
    """Write prose.jsonl, code.jsonl and math.jsonl under ``out_dir``; return per-domain counts."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    corpus = DemoCorpus(root)
    domains = {
        "prose": prose_documents(),
        "code": code_documents(int(code_mb * 1e6), seed),
        "math": math_documents(math_problems, seed),
    }
    manifest = {"python": sys.version.split()[0], "seed": seed, "domains": {}}
    for domain, documents in domains.items():
        path = corpus.jsonl(domain)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w", encoding="utf-8") as handle:
            for text in documents:
                handle.write(json.dumps({"text": text, "domain": domain}) + "\n")
        os.replace(partial, path)
        manifest["domains"][domain] = {"documents": len(documents),
                                       "characters": sum(len(t) for t in documents),
                                       "file": path.name}
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def tokenize_demo_corpus(out_dir: str | Path, tokenizer: str | None = None, workers: int = 1,
                         overwrite: bool = False, show_progress: bool = True) -> dict:
    """Tokenize each domain of a built demo corpus into ``out_dir/tokens/<domain>_text_document``."""
    from megasmol.data.tokenize import missing_parts, prepare_data

    corpus = DemoCorpus(Path(out_dir))
    corpus.prefix("prose").parent.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for domain in DOMAINS:
        if not missing_parts(corpus.prefix(domain)) and not overwrite:
            summaries[domain] = None  # already tokenized: datasets are immutable once renamed
            continue
        summaries[domain] = prepare_data([str(corpus.jsonl(domain))], str(corpus.prefix(domain)),
                                         tokenizer=tokenizer, workers=workers, overwrite=overwrite,
                                         show_progress=show_progress)
    return summaries
