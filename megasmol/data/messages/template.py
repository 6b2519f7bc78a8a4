"""Chat templates: render a conversation to text and find which characters the assistant wrote.

Templates are Jinja, rendered the way transformers' ``apply_chat_template`` renders them (a
sandboxed environment with ``trim_blocks`` / ``lstrip_blocks``, ``raise_exception``,
``strftime_now`` and a ``tojson`` that keeps non-ASCII), so a template gives the same text here
as in transformers. A template marks the text the model must learn to produce with
``{% generation %} ... {% endgeneration %}`` (transformers' convention for
``return_assistant_tokens_mask``); :meth:`ChatTemplate.render` returns those character spans,
and :func:`token_mask` turns them into a per-token mask through the tokenizer's offsets.

Named templates ship in ``templates/``: ``smollm3`` (SmolLM3's hybrid reasoning template with its
replies marked) and ``chatml``. A path to a ``.jinja`` file, or ``tokenizer`` (the tokenizer's own
``chat_template``) are the other sources.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from megasmol.config.typed import ConfigError

TEMPLATE_DIR = Path(__file__).parent / "templates"
NAMED = {"smollm3": "smollm3.jinja", "chatml": "chatml.jinja"}

# Private-use characters bracketing generated text while rendering; removed before returning.
_OPEN, _CLOSE = "\ue000", "\ue001"


class TemplateRenderError(ValueError):
    """A conversation the template cannot render (the message says why)."""


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]]
    """[start, end) character ranges of generated (supervised) text."""


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: brackets its output with marker chars."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_bracket"), [], [], body).set_lineno(lineno)

        def _bracket(self, caller):
            return _OPEN + caller() + _CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


class ChatTemplate:
    """One compiled chat template."""

    def __init__(self, source: str, name: str, now: Optional[Callable[[], datetime]] = None):
        import jinja2

        self.source = source
        self.name = name
        env = _environment()
        clock = now or datetime.now
        env.globals["strftime_now"] = lambda fmt: clock().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(f"chat template {name}: line {exc.lineno}: {exc.message}") from None

    @property
    def marks_generation(self) -> bool:
        """Whether the template marks assistant text (needed for assistant-only loss)."""
        return "generation" in self.source and "endgeneration" in self.source

    def render(self, messages: list[dict], *, tools: Optional[list] = None,
               add_generation_prompt: bool = False, **kwargs) -> Rendered:
        import jinja2

        try:
            raw = self._template.render(messages=messages, tools=tools,
                                        add_generation_prompt=add_generation_prompt, **kwargs)
        except jinja2.TemplateError as exc:
            raise TemplateRenderError(f"template {self.name}: {exc}") from None
        text, spans, pos, opened = [], [], 0, None
        for char in raw:
            if char == _OPEN:
                opened = pos
            elif char == _CLOSE:
                if opened is not None and pos > opened:
                    spans.append((opened, pos))
                opened = None
            else:
                text.append(char)
                pos += 1
        return Rendered("".join(text), spans)


def load_template(choice: str, tokenizer=None, now: Optional[Callable[[], datetime]] = None) -> ChatTemplate:
    """``smollm3``, ``chatml``, a ``.jinja`` file, or ``tokenizer`` (its own ``chat_template``)."""
    if choice in NAMED:
        return ChatTemplate((TEMPLATE_DIR / NAMED[choice]).read_text(), choice, now)
    if choice == "tokenizer":
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source:
            raise ConfigError("--template tokenizer: the tokenizer has no chat_template "
                              f"(use one of {', '.join(NAMED)} or a .jinja file)")
        return ChatTemplate(source, "tokenizer", now)
    path = Path(choice)
    if not path.is_file():
        raise ConfigError(f"--template {choice}: not a template name ({', '.join(NAMED)}, tokenizer) "
                          "nor an existing .jinja file")
    return ChatTemplate(path.read_text(), str(path), now)


def token_mask(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for every token whose characters overlap a generated span, else 0."""
    mask = np.zeros(len(offsets), dtype=np.uint8)
    if not spans:
        return mask
    starts = np.array([s for s, _ in spans])
    ends = np.array([e for _, e in spans])
    for i, (a, b) in enumerate(offsets):
        if b <= a:
            continue
        j = np.searchsorted(ends, a, side="right")  # first span ending after this token starts
        if j < len(spans) and starts[j] < b:
            mask[i] = 1
    return mask
