"""What a ``prepare-*`` command wrote, and what it left out and why: the record written as the
prefix's description (and ``PREFIX.stats.json``) and the lines the command prints.

:class:`MaskedSummary` holds what every masked-documents preparation counts and prints the shared
lines (the files written, tokens, time, what was left out); a command's summary adds its own
counts as rows (:meth:`MaskedSummary.rows`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from megasmol.data.masked.layout import mask_prefix, tokenizer_path


@dataclass
class MaskedSummary:
    output_prefix: str
    """``--out``."""
    template: str
    """The chat template's name."""
    tokenizer: str
    """The tokenizer the chat tokenizer was made from."""
    eos_id: int
    """The id ending every document."""
    tokens: int = 0
    """Tokens written, EOS included."""
    supervised_tokens: int = 0
    """Tokens the loss mask covers."""
    truncated: int = 0
    """Documents cut to ``--max-length``."""
    seconds: float = 0.0
    rejected: dict = field(default_factory=dict)
    """{reason: records left out for it}."""
    rejected_examples: dict = field(default_factory=dict)
    """{reason: where the first such record is}."""
    format: str = ""
    """The description's format tag (each kind's own)."""

    @property
    def supervised_share(self) -> float:
        return self.supervised_tokens / self.tokens if self.tokens else 0.0

    def outputs(self) -> list[str]:
        """The files the ``wrote`` line names."""
        prefix = self.output_prefix
        return [f"{prefix}.bin/.idx", f"{mask_prefix(prefix)}.bin/.idx", f"{tokenizer_path(prefix)}/"]

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines between ``wrote`` and the notes: the command's own."""
        raise NotImplementedError

    def notes(self) -> list[str]:
        return []

    def share_text(self) -> str:
        return f"{100 * self.supervised_share:.1f}% of tokens"

    def tokens_row(self) -> tuple[str, str]:
        return "tokens", f"{self.tokens:,} (EOS included)"

    def time_row(self) -> tuple[str, str]:
        return "time", f"{self.seconds:.1f} s"

    def lines(self) -> list[str]:
        out = ["wrote " + ", ".join(self.outputs())]
        out += [f"  {label:<14} {value}" for label, value in self.rows()]
        out += self.notes()
        for reason, count in sorted(self.rejected.items()):
            out.append(f"  left out: {reason}: {count:,} (first at {self.rejected_examples[reason]})")
        return out

    def count_rejects(self, issues) -> None:
        """Take what was left out from a ``ReadIssues``."""
        self.rejected, self.rejected_examples = dict(issues.counts), dict(issues.examples)

    def record(self, prefix: Path) -> dict:
        """The description written beside ``prefix``."""
        return {**asdict(self), "tokenizer_dir": tokenizer_path(prefix).name,
                "mask_prefix": Path(mask_prefix(prefix)).name}
