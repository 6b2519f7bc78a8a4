"""Tokenizer fertility: tokens per word, and the share of words split into 2+ tokens.

As in the playbook (and FineWeb2's tokenizer analysis): the text is split into words, each word
is encoded on its own without special tokens, fertility is the mean token count per word and
the proportion of continued words is the share with two or more tokens. Lower is better for both.

Word splitting: datatrove's per-language word tokenizers when datatrove is installed
(``pip install 'datatrove[multilingual]'``); otherwise a documented fallback: Unicode word runs
(``\\w+``, apostrophes kept inside words) plus each other non-space character as its own word.
The fallback treats a run of Chinese/Japanese/Thai characters as one word, which overstates
fertility for those scripts; the table says which splitter was used.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")


def fallback_words(text: str) -> list[str]:
    return WORD.findall(text)


def word_splitter(language: str) -> tuple[Callable[[str], list[str]], str]:
    """(split function, its name) for an ISO language code."""
    try:
        from datatrove.utils.word_tokenizers import load_word_tokenizer

        tokenizer = load_word_tokenizer(language)
        return tokenizer.word_tokenize, f"datatrove:{type(tokenizer).__name__}"
    except Exception:  # datatrove absent, or no tokenizer for this language
        return fallback_words, "regex fallback"


@dataclass
class FertilityRow:
    tokenizer: str
    language: str
    words: int
    tokens: int
    continued: int
    splitter: str

    @property
    def fertility(self) -> float:
        return self.tokens / self.words if self.words else 0.0

    @property
    def continued_share(self) -> float:
        return self.continued / self.words if self.words else 0.0


def measure(tokenizer, text: str, split: Callable[[str], list[str]]) -> tuple[int, int, int]:
    words = split(text)
    if not words:
        return 0, 0, 0
    encoded = tokenizer(words, add_special_tokens=False)["input_ids"]
    counts = [len(ids) for ids in encoded]
    return len(words), sum(counts), sum(c >= 2 for c in counts)


def fertility_table(tokenizers: dict[str, object], texts: dict[str, str],
                    splitters: Optional[dict[str, tuple]] = None) -> list[FertilityRow]:
    rows = []
    for language, text in texts.items():
        split, name = (splitters or {}).get(language) or word_splitter(language)
        for label, tokenizer in tokenizers.items():
            words, tokens, continued = measure(tokenizer, text, split)
            rows.append(FertilityRow(label, language, words, tokens, continued, name))
    return rows


def render(rows: list[FertilityRow]) -> str:
    header = (f"{'tokenizer':<20} {'language':<8} {'words':>8} {'tokens':>8} {'fertility':>9} "
              f"{'continued':>9}  splitter")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.tokenizer:<20} {r.language:<8} {r.words:>8,} {r.tokens:>8,} {r.fertility:>9.3f} "
                     f"{100 * r.continued_share:>8.1f}%  {r.splitter}")
    return "\n".join(lines)


def write_csv(rows: list[FertilityRow], path: str | Path) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["tokenizer", "language", "words", "tokens", "fertility", "continued_share",
                         "splitter"])
        for r in rows:
            writer.writerow([r.tokenizer, r.language, r.words, r.tokens, f"{r.fertility:.6f}",
                             f"{r.continued_share:.6f}", r.splitter])
    return path
