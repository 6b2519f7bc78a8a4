"""Small conversation sets built offline, for the SFT demo and the tests.

* :func:`arithmetic_conversations`: "What is A + B?" answered "A + B = C." -- a fixed format a
  model can be checked against (held-out accuracy before and after SFT);
* :func:`noise_conversations`: user turns of random words, assistant turns a fixed reply -- the
  assistant text is learnable, the user text is not, so an assistant-only loss must lower the
  one and leave the other near chance.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

SYSTEM = "You are a calculator. Answer in the form A + B = C. /no_think"
QUESTION = "What is {a} + {b}?"
ANSWER = "{a} + {b} = {c}."
_ANSWER = re.compile(r"^\s*(\d+) \+ (\d+) = (\d+)\.")
_WHOLE_ANSWER = re.compile(r"(\d+) \+ (\d+) = (\d+)\.")

WORDS = ("apple river stone cloud window garden silver music paper candle forest bridge yellow "
         "engine pocket winter mirror basket planet rabbit ladder violet copper desert harbor "
         "jungle marble needle orange pencil quartz saddle tunnel velvet walnut anchor blanket "
         "cactus dragon feather glacier hammer island jacket kettle lantern meadow").split()
REPLY = "Thank you, I have noted your message."


def arithmetic_pairs(count: int, seed: int, high: int = 20) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(0, high), rng.randint(0, high)) for _ in range(count)]


def arithmetic_record(a: int, b: int, answered: bool = True) -> dict:
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(a=a, b=b)}]
    if answered:
        messages.append({"role": "assistant", "content": ANSWER.format(a=a, b=b, c=a + b)})
    return {"messages": messages}


def split_arithmetic(train: int, held_out: int, seed: int, high: int = 20):
    """Disjoint (train, held-out) question pairs: no held-out question is seen in training."""
    pool = sorted({(a, b) for a in range(high + 1) for b in range(high + 1)})
    random.Random(seed).shuffle(pool)
    if train + held_out > len(pool):
        raise ValueError(f"only {len(pool)} distinct questions with operands up to {high}")
    return pool[held_out:held_out + train], pool[:held_out]


def grade(reply: str, a: int, b: int) -> tuple[bool, bool, bool]:
    """(in the ``X + Y = Z.`` format, with the asked A and B, correct)."""
    match = _ANSWER.match(reply)
    if not match:
        return False, False, False
    echoed = (int(match.group(1)), int(match.group(2))) == (a, b)
    return True, echoed, echoed and int(match.group(3)) == a + b


def in_answer_form(reply: str) -> bool:
    """The whole reply is one ``X + Y = Z.`` (whitespace around it aside): the form the system turn
    asks for and nothing else, whatever the numbers (``grade`` reads only the reply's start)."""
    return _WHOLE_ANSWER.fullmatch(reply.strip()) is not None


def noise_conversations(count: int, seed: int, words_per_turn: int = 8,
                        turns: int = 2) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(count):
        messages = []
        for _ in range(turns):
            messages.append({"role": "user", "content": " ".join(rng.choice(WORDS)
                                                                 for _ in range(words_per_turn))})
            messages.append({"role": "assistant", "content": REPLY})
        records.append({"messages": messages})
    return records


def write_jsonl(records: list[dict], path: Path, extra_lines: Optional[list[str]] = None) -> Path:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")
        for line in extra_lines or []:
            handle.write(line + "\n")
    tmp.replace(path)
    return path
