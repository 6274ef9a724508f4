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

import json
from dataclasses import dataclass
from typing import Any

from forklight.data.records import (
    FieldNames, LoadReport, QuestionRecord, Row, Trace, add_question, bad_row, merge_trace, question_fields, show,
)
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


# ---- traces and their flags ----------------------------------------------------------------
Candidate = tuple[str, str | None, str | None]  # (text, source, reason it is left out or None)


def apply_think(text: str, think: ThinkMarkup) -> tuple[str, str | None]:
    """``(text, None)`` as ``think`` keeps it, or ``("", reason)`` when it leaves nothing: ``incomplete`` (a think
    block that never closes, when the markup is stripped or a part is kept) or ``empty`` (the part kept is empty).
    A trace without any markup is kept whole in every mode."""
    if think.identity:
        return text, None
    parts = split_think(text, think.open, think.close)
    if not parts.marked:
        return text, None
    if not parts.closed:
        return "", "incomplete"
    if think.part == "answer":
        kept = parts.answer
    elif think.markup == "keep":
        block = f"{think.open}\n{parts.reasoning}\n{think.close}"
        kept = block if think.part == "reasoning" else f"{block}\n\n{parts.answer}".strip()
    else:
        kept = parts.reasoning if think.part == "reasoning" else f"{parts.reasoning}\n\n{parts.answer}".strip()
    return (kept, None) if kept.strip() else ("", "empty")


_TRUE = {"true", "yes", "1", "y", "correct"}
_FALSE = {"false", "no", "0", "n", "incorrect"}


def flag_value(loc: str, value: Any, where: str) -> bool:
    """A keep flag: a bool, 0/1, or a yes/no/true/false string (s1K's grades are "Yes"/"No"); None = not kept."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise bad_row(loc, f"{where} must be a keep flag (true/false, 1/0 or yes/no), got {show(value)}",
                  "fix the flag or remove the column from data.fields.keep_columns")


def _column(loc: str, row: Row, name: str, key: str) -> Any:
    """``row[name]`` for the mapped column ``data.fields.<key>``: a column that does not exist is an error."""
    if name not in row:
        present = ", ".join(sorted(map(str, row)))
        raise bad_row(loc, f"column '{name}' (data.fields.{key}) does not exist; the row has: {present}",
                      f"fix data.fields.{key}", "missing_column")
    return row[name]


def list_flags(loc: str, row: Row, f: FieldNames, count: int) -> list[str | None]:
    """Per trace of a grouped row, why its flags leave it out (a false flag: the flag column's name; a finish reason
    other than ``stop``: ``incomplete``), or None. Every flag column is a list as long as the trace list."""
    reasons: list[str | None] = [None] * count
    columns = [(f.finish_reasons, "finish_reasons")] if f.finish_reasons else []  # first: "incomplete" says most
    columns += [(name, "keep_columns") for name in f.keep_columns or []]
    for name, key in columns:
        values = _column(loc, row, name, key)
        if not isinstance(values, list) or len(values) != count:
            what = f"{len(values)} flags" if isinstance(values, list) else show(values)
            raise bad_row(loc, f"column '{name}' (data.fields.{key}) has {what} for {count} traces in '{f.traces}'",
                          "give one flag per trace, in the order of the traces", "flags_mismatch")
        for i, value in enumerate(values):
            if reasons[i] is not None:
                continue
            if key == "finish_reasons":
                if value is not None and not isinstance(value, str):
                    raise bad_row(loc, f"{name}[{i}] must be a string, got {show(value)}", "fix the finish reason")
                reasons[i] = "incomplete" if value not in (None, "stop") else None
            elif not flag_value(loc, value, f"{name}[{i}]"):
                reasons[i] = name
    return reasons


def keep_traces(loc: str, candidates: list[Candidate], think: ThinkMarkup, report: LoadReport) -> list[Trace]:
    """The candidates that neither their flags nor ``think`` leave out; every one counted in ``report``
    (``traces_read`` per source, ``dropped_traces`` per (reason, source))."""
    kept = []
    for text, source, reason in candidates:
        report.traces_read[source or "-"] += 1
        if reason is None:
            text, reason = apply_think(text, think)
        if reason is not None:
            report.dropped_traces[(reason, source or "-")] += 1
            continue
        kept.append(Trace(text, source, loc))
    return kept


# ---- columns: one column per trace (s1K-1.1) --------------------------------------------------------
def check_column_fields(f: FieldNames) -> None:
    """``fields.trace_columns`` and the lists that must run beside it."""
    if not f.trace_columns:
        raise ConfigError("data.layout=columns needs data.fields.trace_columns: the columns that each hold one trace")
    for key in ("attempt_columns", "keep_columns"):
        given = getattr(f, key)
        if given is not None and len(given) != len(f.trace_columns):
            raise ConfigError(f"data.fields.{key} has {len(given)} columns for {len(f.trace_columns)} "
                              "data.fields.trace_columns; give one per trace column, in the same order")


def column_candidates(loc: str, row: Row, f: FieldNames, think: ThinkMarkup) -> list[Candidate]:
    """One candidate per trace column, its name the source; an attempt column adds the final answer after the
    reasoning (``<think>reasoning</think> attempt``, so ``data.think`` applies). An empty trace cell is ``missing``,
    a reasoning without its attempt ``incomplete``, a false keep flag the flag column's name."""
    candidates = []
    for i, name in enumerate(f.trace_columns or []):
        text = _column(loc, row, name, f"trace_columns[{i}]")
        if text is not None and not isinstance(text, str):
            raise bad_row(loc, f"column '{name}' must hold a trace string, got {show(text)}", "fix the trace")
        if f.attempt_columns:
            attempt = _column(loc, row, f.attempt_columns[i], f"attempt_columns[{i}]")
            if attempt is not None and not isinstance(attempt, str):
                raise bad_row(loc, f"column '{f.attempt_columns[i]}' must hold the final answer as a string, "
                              f"got {show(attempt)}", "fix the answer")
            if text and text.strip() and not (attempt and attempt.strip()):
                candidates.append((text, name, "incomplete"))  # reasoning without its final answer
                continue
            if text and text.strip():
                text = f"{think.open}\n{text.strip()}\n{think.close}\n\n{attempt.strip()}"
        reason = None if text and text.strip() else "missing"
        if reason is None and f.keep_columns:
            flag = f.keep_columns[i]
            reason = None if flag_value(loc, _column(loc, row, flag, f"keep_columns[{i}]"), f"column '{flag}'") else flag
        candidates.append((text or "", name, reason))
    return candidates


def used_columns(f: FieldNames) -> set[str]:
    """The columns a layout reads (the others are kept as the record's ``columns``, for verifiers)."""
    names = {f.id, f.prompt, f.messages, f.answer, f.traces, f.trace, f.source, f.system} - {None}
    names |= set(f.trace_columns or []) | set(f.attempt_columns or []) | set(f.keep_columns or [])
    return names | ({f.finish_reasons} if f.finish_reasons else set())


def add_columns_row(loc: str, row: Row, f: FieldNames, think: ThinkMarkup, report: LoadReport,
                    groups: dict[Any, QuestionRecord]) -> None:
    """One row of the columns layout (a whole question) into ``groups``; a question whose every trace is left out
    is counted in ``report.emptied``."""
    prompt, messages, answer, qid = question_fields(loc, row, f)
    traces = keep_traces(loc, column_candidates(loc, row, f, think), think, report)
    columns = {k: v for k, v in row.items() if k not in used_columns(f)}
    add_question(QuestionRecord(qid, prompt, messages, answer, traces, loc, columns), groups, report)


# ---- chat: a conversation per row (OpenThoughts: from/value; SFT sets: role/content) ---------------
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}


def conversation(loc: str, row: Row, f: FieldNames) -> tuple[list[dict[str, str]], str]:
    """``(question messages, trace)``: the conversation's last assistant turn is the trace, the turns before it
    the question (``role/content`` or ``from/value`` turns; a ``fields.system`` column goes first)."""
    if f.messages is None:
        raise ConfigError("data.layout=chat reads the conversation from data.fields.messages; set it (e.g. conversations)")
    turns = _column(loc, row, f.messages, "messages")
    fix = 'write each turn as {"role": ..., "content": ...} or {"from": ..., "value": ...}'
    if not isinstance(turns, list) or not turns:
        raise bad_row(loc, f"field '{f.messages}' must be a non-empty list of turns, got {show(turns)}", fix)
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, dict) and "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        elif isinstance(turn, dict) and "from" in turn:
            role, content = turn.get("from"), turn.get("value")
        else:
            raise bad_row(loc, f"{f.messages}[{i}] is {show(turn)}, not a turn", fix)
        if role not in ROLES or not isinstance(content, str):
            raise bad_row(loc, f"{f.messages}[{i}] has role {role!r} and content {show(content)}; roles are "
                          f"{', '.join(sorted(ROLES))} and the content a string", fix)
        messages.append({"role": ROLES[role], "content": content})
    system = row.get(f.system)
    if isinstance(system, str) and system.strip() and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise bad_row(loc, f"the conversation in '{f.messages}' has no assistant turn, so no trace",
                      "add the assistant's answer, or read the file with data.layout=prompts for predict", "no_trace")
    if last != len(messages) - 1:
        raise bad_row(loc, f"the conversation in '{f.messages}' goes on after its last assistant turn "
                      f"(a {messages[-1]['role']} turn)", "end each conversation with the assistant's trace")
    if not any(m["role"] == "user" for m in messages[:last]):
        raise bad_row(loc, f"the conversation in '{f.messages}' has no user turn before its assistant turn",
                      "start with the question as a user turn")
    return messages[:last], messages[last]["content"]


def add_chat_row(loc: str, row: Row, f: FieldNames, think: ThinkMarkup, report: LoadReport,
                 groups: dict[Any, QuestionRecord]) -> None:
    """One conversation (one trace) merged into its question in ``groups`` (grouped by id, else by the question's
    turns, as the flat layout groups)."""
    messages, text = conversation(loc, row, f)
    qid, answer = row.get(f.id), row.get(f.answer)
    probe = {f.messages: messages, **({f.id: qid} if qid is not None else {}),
             **({f.answer: answer} if answer is not None else {})}
    _, messages, answer, qid = question_fields(loc, probe, f)
    source = row.get(f.source)
    if source is not None and not isinstance(source, str):
        raise bad_row(loc, f"field '{f.source}' must be a string, got {show(source)}", "name the teacher as a string")
    key = ("id", qid) if qid is not None else ("messages", json.dumps(messages))
    traces = keep_traces(loc, [(text, source, None if text.strip() else "empty")], think, report)
    if not traces:
        report.dropped_keys.add(key)
        return
    columns = {k: v for k, v in row.items() if k not in used_columns(f)}
    merge_trace(loc, key, qid, None, messages, answer, traces[0], columns, groups)
