"""Corpus layouts beyond grouped/flat, and the think markup of long chain-of-thought traces.

Public multi-trace corpora come in their own layouts; each is read by field mapping, no code
(``data.fields``, ``data.layout``):

- ``columns`` (s1K-1.1): one column per trace (``fields.trace_columns``), the column's name is the
  trace's source; optional final answers beside them (``fields.attempt_columns``) and keep flags
  (``fields.keep_columns``, e.g. ``deepseek_grade``);
- grouped with per-trace flags (OpenR1-Math-220k): the list column ``fields.traces`` with list columns
  of keep flags (``fields.keep_columns``) and finish reasons (``fields.finish_reasons``);
- ``chat`` (OpenThoughts, and any ``messages`` SFT set): a conversation per row in ``role/content`` or
  ``from/value`` style, the last assistant turn is the trace, the turns before it the question.

:class:`ThinkMarkup` (``data.think``) keeps or strips ``<think>…</think>`` and keeps the reasoning, the
final answer after it, or both.
"""

from __future__ import annotations

from dataclasses import dataclass

from forklight.errors import ConfigError

THINK_MARKUP = ("keep", "strip")
THINK_PARTS = ("both", "reasoning", "answer")


@dataclass
class ThinkMarkup:
    """What a trace keeps of its ``<think>…</think>`` block and of the answer after it (``data.think``)."""

    markup: str = "keep"  # keep the open/close tags, or strip them
    part: str = "both"  # both | reasoning (the think block only) | answer (what follows it)
    open: str = "<think>"
    close: str = "</think>"

    def __post_init__(self) -> None:
        for key, value, allowed in (("markup", self.markup, THINK_MARKUP), ("part", self.part, THINK_PARTS)):
            if value not in allowed:
                raise ConfigError(f"data.think.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if not self.open or not self.close:
            raise ConfigError("data.think.open and data.think.close must be non-empty strings (e.g. '<think>', '</think>')")

    @property
    def identity(self) -> bool:
        """Whether traces are kept exactly as read."""
        return self.markup == "keep" and self.part == "both"


@dataclass
class ThinkParts:
    """A trace cut at its think block."""

    reasoning: str  # inside the think block (the whole text when there is no markup)
    answer: str  # after the close tag ("" when there is none)
    marked: bool  # the text has an open or a close tag
    closed: bool  # the reasoning is closed (a close tag), or the text has no markup at all


def split_think(text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> ThinkParts:
    """``text`` cut into reasoning and answer at the first ``close_tag`` (a leading ``open_tag`` is removed).

    Without any markup the whole text is the reasoning and it counts as closed; an open tag without a
    close tag is an unfinished reasoning (``closed=False``), e.g. a generation cut at its length limit.
    """
    head, found, tail = text.partition(close_tag)
    start = head.find(open_tag)
    reasoning = head[start + len(open_tag):] if start >= 0 else head
    if found:
        return ThinkParts(reasoning.strip(), tail.strip(), True, True)
    return ThinkParts(reasoning.strip(), "", start >= 0, start < 0)


def final_answer(text: str, open_tag: str = "<think>", close_tag: str = "</think>") -> str:
    """What a verifier scores: the text after the think block, or the whole text without one."""
    parts = split_think(text, open_tag, close_tag)
    return parts.answer if parts.marked else text
