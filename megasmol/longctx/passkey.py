"""Passkey retrieval (needle in a haystack): did the long-context extension work?

A prompt of the requested length in tokens is built from an instruction, repeated filler
sentences (no download: the classic "The grass is green..." filler of the passkey test, Mohtashami
& Jaggi 2023), a needle "The pass key is NNNNN. Remember it. NNNNN is the pass key." placed at a
depth (0 = right after the instruction, 1 = just before the question) and the question. The
model generates a few tokens greedily and a trial counts as retrieved when the first number in
the generated text is the key.

The scorer sees only the model's new tokens: ``generate`` receives the prompt ids and returns
generated ids; the key is never handed to it, and nothing but those ids is scored.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about it.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"

Generate = Callable[[torch.Tensor], Sequence[int]]


@dataclass
class Trial:
    length: int
    depth: float
    key: str
    prompt_tokens: int
    generated: str
    retrieved: bool


@dataclass
class PasskeyResult:
    lengths: list[int]
    depths: list[float]
    trials: list[Trial] = field(default_factory=list)

    def accuracy(self, length: int, depth: float) -> float:
        hits = [t.retrieved for t in self.trials if t.length == length and t.depth == depth]
        return sum(hits) / len(hits) if hits else 0.0

    def grid(self) -> list[list[float]]:
        return [[self.accuracy(n, d) for d in self.depths] for n in self.lengths]

    @property
    def overall(self) -> float:
        return sum(t.retrieved for t in self.trials) / max(len(self.trials), 1)

    def table(self) -> str:
        head = "length \\ depth " + "".join(f"{d:>8.2f}" for d in self.depths) + "     mean"
        lines = [head, "-" * len(head)]
        for n, row in zip(self.lengths, self.grid()):
            lines.append(f"{n:>14,} " + "".join(f"{100 * a:>7.0f}%" for a in row)
                         + f"{100 * sum(row) / len(row):>8.0f}%")
        lines.append(f"overall: {100 * self.overall:.1f}% of {len(self.trials)} trials "
                     "(chance: ~0% for a 5-digit key)")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"lengths": self.lengths, "depths": self.depths, "accuracy": self.grid(),
                "overall": self.overall, "trials": [vars(t) for t in self.trials]}


def score(generated_text: str, key: str) -> bool:
    """Retrieved when the first number the model writes is exactly the key."""
    match = re.search(r"\d+", generated_text)
    return bool(match) and match.group(0) == key


def build_prompt(tokenizer, length: int, depth: float, key: str) -> list[int]:
    """Token ids of a prompt of about ``length`` tokens with the needle at ``depth``."""
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    fixed = len(encode(INSTRUCTION + NEEDLE.format(key=key) + QUESTION))
    per_filler = len(encode(" " + FILLER))
    count = max(1, (length - fixed) // per_filler)
    before = round(depth * count)
    text = (INSTRUCTION + (" " + FILLER) * before + NEEDLE.format(key=key)
            + (" " + FILLER) * (count - before) + QUESTION)
    ids = encode(text)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    return ids


def evaluate(generate: Generate, tokenizer, lengths: Sequence[int], depths: Sequence[float],
             trials: int, seed: int = 0, progress=None) -> PasskeyResult:
    rng = random.Random(seed)
    result = PasskeyResult(list(lengths), list(depths))
    for length in lengths:
        for depth in depths:
            for _ in range(trials):
                key = str(rng.randint(10000, 99999))
                ids = build_prompt(tokenizer, length, depth, key)
                new_ids = list(generate(torch.tensor([ids])))
                text = tokenizer.decode(new_ids, skip_special_tokens=True)
                result.trials.append(Trial(length, depth, key, len(ids), text, score(text, key)))
                if progress is not None:
                    progress.update(1)
    return result


def megatron_generator(checkpoint: str | Path, max_new_tokens: int, yarn_factor: float | None = None):
    """Greedy decoding with a checkpoint's Megatron-Core model (optionally with YaRN)."""
    from megasmol.decode.cached import greedy_generate
    from megasmol.model.load import load_checkpoint_model, yarn_overrides

    model, _, _ = load_checkpoint_model(checkpoint, overrides=yarn_overrides(checkpoint, yarn_factor))

    def generate(prompt: torch.Tensor) -> list[int]:
        out = greedy_generate(model, prompt, max_new_tokens)
        return out[0, prompt.shape[1]:].tolist()

    return generate


def hf_generator(model_dir: str | Path, max_new_tokens: int):
    from megasmol.convert.hf_dir import load_hf_causal_lm

    model = load_hf_causal_lm(model_dir)

    def generate(prompt: torch.Tensor) -> list[int]:
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False,
                                 attention_mask=torch.ones_like(prompt), eos_token_id=None,
                                 pad_token_id=model.config.eos_token_id)
        return out[0, prompt.shape[1]:].tolist()

    return generate


def write_outputs(result: PasskeyResult, out_dir: Path, label: str) -> tuple[Path, Path]:
    from megasmol.utils.plot import heatmap

    out_dir.mkdir(parents=True, exist_ok=True)
    report = out_dir / "passkey.json"
    report.write_text(json.dumps({"model": label, **result.to_json()}, indent=2))
    png = heatmap(out_dir / "passkey.png", result.grid(), rows=[f"{n:,}" for n in result.lengths],
                  columns=[f"{d:g}" for d in result.depths],
                  title=f"passkey retrieval: {label}", row_label="length (tokens)",
                  column_label="needle depth")
    return report, png
