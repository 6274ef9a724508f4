"""Question records: the typed form every input layout is read into, with validation.

A record is one question with its set of correct reasoning traces. This file holds the types, the readers of
files and datasets (:func:`read_rows`) and the checks of a row's fields; :mod:`forklight.data.loading` turns rows
into questions in one of these layouts (DESIGN.md §3), field names mapped by :class:`FieldNames`:

- grouped: ``{"id", "prompt" | "messages", "answer", "traces": [str | {"text", "source"}]}``, optionally with
  per-trace keep flags and finish reasons beside the trace list (OpenR1-Math-220k);
- flat: one trace per row ``{"id", "prompt" | "messages", "answer", "trace", "source"}``,
  rows grouped by ``id`` (or by prompt text when there is no id);
- columns and chat (s1K-1.1, OpenThoughts): :mod:`forklight.data.layouts`, which also applies ``data.think``.
"""

from __future__ import annotations

import codecs
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from forklight.errors import UserError


@dataclass
class Trace:
    """One correct reasoning trace of a question."""

    text: str
    source: str | None = None  # teacher / strategy name; None when the data has none
    location: str = field(default="", compare=False)  # row it was read from (flat: its own row), e.g. "train.jsonl:12"


@dataclass
class QuestionRecord:
    """One question and its set of traces, as read from a file or made by the toy task."""

    id: str
    prompt: str | None  # plain prompt text (rendered with the chat template or prompt_template)
    messages: list[dict[str, str]] | None  # chat messages, alternative to ``prompt``
    answer: str | None  # gold answer given to the verifier
    traces: list[Trace]
    location: str = ""  # where the record came from, e.g. "train.jsonl:12"
    columns: dict[str, Any] = field(default_factory=dict)  # other fields, passed to verifiers


@dataclass
class FieldNames:
    """Field names of the input files (configurable per dataset)."""

    id: str = "id"
    prompt: str | None = "prompt"  # null: the question is only ever given as messages
    messages: str | None = "messages"  # null: ignore a messages column (e.g. OpenR1's, which holds an answer too)
    answer: str = "answer"
    traces: str = "traces"  # grouped layout: list of traces
    trace: str = "trace"  # flat layout: one trace per row
    text: str = "text"  # inside a trace object
    source: str = "source"  # inside a trace object, or a column in the flat layout
    # columns layout (s1K-1.1): one column per trace, the column's name is its source
    trace_columns: list[str] | None = None
    attempt_columns: list[str] | None = None  # final answers beside trace_columns (s1K's *_attempt), after the reasoning
    # per-trace keep flags: grouped layout, list columns beside `traces` (OpenR1's correctness_math_verify,
    # is_reasoning_complete); columns layout, one column per trace column (s1K's *_grade). A trace is kept when all are true.
    keep_columns: list[str] | None = None
    finish_reasons: str | None = None  # grouped layout: list column of finish reasons; not "stop" = incomplete (OpenR1)
    system: str = "system"  # chat layout: a system message column put first (OpenThoughts)


class RecordError(UserError, ValueError):
    """A bad input record: the message names the file, line (or row) and what to do.

    ``reason`` is a short key counted in the validation summary (e.g. ``malformed_json``).
    """

    def __init__(self, message: str, reason: str = "unreadable_source") -> None:
        super().__init__(message)
        self.reason = reason


LAYOUTS = ("auto", "grouped", "flat", "columns", "chat", "prompts")
ON_BAD_RECORD = ("error", "skip")
Row = dict[str, Any]


@dataclass
class LoadReport:
    """What a load did: rows seen, questions kept and one message per skipped row."""

    path: str
    rows_read: int = 0  # raw rows/lines seen (blank jsonl lines not counted)
    questions: int = 0  # records returned
    skipped: list[str] = field(default_factory=list)  # one full error message per skipped row
    skip_reasons: Counter[str] = field(default_factory=Counter)  # RecordError.reason -> rows skipped
    traces_read: Counter[str] = field(default_factory=Counter)  # source ("-": none) -> traces read
    # (reason, source) -> traces left out by the data's own flags or markup: a keep flag false (its column's name),
    # "incomplete" (a finish reason other than stop, or a think block never closed when data.think needs it)
    dropped_traces: Counter[tuple[str, str]] = field(default_factory=Counter)
    emptied: int = 0  # questions left without traces by those drops (not returned; not bad records)
    dropped_keys: set = field(default_factory=set, repr=False)  # flat/chat: questions a dropped row belonged to

    def summary(self) -> str:
        """One line for the log, e.g. ``"train.jsonl: 120 rows -> 30 questions, 2 skipped"``."""
        name = os.path.basename(self.path.rstrip("/\\")) if os.path.exists(self.path) else self.path
        return f"{name}: {self.rows_read} rows -> {self.questions} questions, {len(self.skipped)} skipped"


def bad_row(loc: str, what: str, fix: str, reason: str = "bad_field") -> RecordError:
    """The error for a bad row, in the form ``"<location>: <what is wrong>; <how to fix>"``.

    ``reason`` (counted when skipping): ``bad_field`` is an empty or wrong-typed field.
    """
    return RecordError(f"{loc}: {what}; {fix}", reason)


def show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def read_rows(path: str, split: str, name: str | None = None) -> Iterator[tuple[str, Row | RecordError]]:
    """Yield ``(location, row)`` from a file, a local directory or a ``datasets`` name (``name``: its config)."""
    suffix = os.path.splitext(path)[1].lower()
    looks_local = os.path.isabs(path) or path.startswith(".") or suffix in (".jsonl", ".json", ".parquet")
    if looks_local and not os.path.exists(path):
        raise RecordError(f"{path}: no such file or directory; {_ACCEPTED}")
    if os.path.isfile(path) and suffix == ".jsonl":
        yield from _read_jsonl(path)
    elif os.path.isfile(path) and suffix == ".json":
        yield from _read_json(path)
    elif os.path.isfile(path) and suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            batches = pq.ParquetFile(path).iter_batches()
            rows = (row for batch in batches for row in batch.to_pylist())
            yield from ((f"{path}:row {k}", row) for k, row in enumerate(rows, 1))
        except pa.ArrowException as err:
            raise RecordError(f"{path}: cannot read parquet ({err}); check that it is parquet") from err
    else:
        import datasets  # slow import, only when needed

        try:
            dataset = datasets.load_dataset(path, name, split=split)
        except Exception as err:  # noqa: BLE001 - datasets raises many kinds
            raise RecordError(f"{path}: cannot load it ({type(err).__name__}: {err}); {_ACCEPTED}") from err
        yield from ((f"{path}[{split}]:row {k}", row) for k, row in enumerate(dataset, 1))


_ACCEPTED = "give a .jsonl, .json or .parquet file, a local directory or a datasets.load_dataset name"


def _read_jsonl(path: str) -> Iterator[tuple[str, Row | RecordError]]:
    """Decode line by line, so an undecodable line is reported with its number."""
    with open(path, "rb") as fh:
        data = fh.read().removeprefix(codecs.BOM_UTF8)
    for number, raw in enumerate(data.split(b"\n"), 1):
        loc = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            what = f"line is not valid UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1})"
            yield loc, bad_row(loc, what, "save the file as UTF-8", "not_utf8")
            continue
        if not line.strip():
            continue
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as err:
            yield loc, bad_row(loc, f"malformed JSON ({err})", "write one complete JSON object per line", "malformed_json")


def _read_json(path: str) -> Iterator[tuple[str, Row | RecordError]]:
    try:
        with open(path, encoding="utf-8-sig") as fh:
            data = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{path}: not a valid UTF-8 JSON file ({err}); fix it or use .jsonl") from err
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise RecordError(f"{path}: top level is {type(data).__name__}; give a list of objects or "
                          '{"data": [...]}')
    yield from ((f"{path}:item {k}", item) for k, item in enumerate(data, 1))


Question = tuple[str | None, list[dict[str, str]] | None, str | None, str | None]


def question_fields(loc: str, row: Row, f: FieldNames) -> Question:
    """Validate the question fields of a row: ``(prompt, messages, answer, id)``; None = absent."""
    prompt, messages, answer, qid = (row.get(name) for name in (f.prompt, f.messages, f.answer, f.id))
    if prompt is None and messages is None:
        raise bad_row(loc, f"neither '{f.prompt}' nor '{f.messages}' is present",
                   f"give the question as '{f.prompt}' (a string) or '{f.messages}' (chat messages)", "missing_field")
    if prompt is not None and messages is not None:
        raise bad_row(loc, f"the question is given twice, as '{f.prompt}' and as '{f.messages}'",
                      f"keep one: set data.fields.messages: null to ask with '{f.prompt}', or data.fields.prompt: null",
                      "ambiguous_question")
    if prompt is not None and not (isinstance(prompt, str) and prompt.strip()):
        raise bad_row(loc, f"field '{f.prompt}' must be a non-empty string, got {show(prompt)}",
                   "give the question text as a string")
    if messages is not None:
        messages = _messages(loc, messages, f.messages)
    if answer is not None:
        if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
            raise bad_row(loc, f"field '{f.answer}' must be a string or a number, got {show(answer)}",
                       "write the gold answer as a string")
        answer = str(answer)
    if qid is not None:
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
            raise bad_row(loc, f"field '{f.id}' must be a non-empty string or an integer, got {show(qid)}",
                       "give every question a string id, or drop the field")
        qid = str(qid)
    return prompt, messages, answer, qid


def _messages(loc: str, value: Any, name: str) -> list[dict[str, str]]:
    fix = 'write them as [{"role": "user", "content": "..."}, ...]'
    if not isinstance(value, list) or not value:
        what = "an empty list" if isinstance(value, list) else show(value)
        raise bad_row(loc, f"field '{name}' must be a non-empty list of chat messages, got {what}", fix)
    for i, msg in enumerate(value):
        if not (isinstance(msg, dict) and all(isinstance(msg.get(k), str) for k in ("role", "content"))):
            what = f"{name}[{i}] must be an object with string 'role' and 'content', got {show(msg)}"
            raise bad_row(loc, what, fix)
    return [{k: v for k, v in msg.items() if v is not None} for msg in value]


def trace_source(loc: str, value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise bad_row(loc, f"{what} must be a string, got {show(value)}", "name the teacher as a string")
    return value


def add_question(record: QuestionRecord, groups: dict[Any, QuestionRecord], report: LoadReport) -> None:
    """A whole question (a grouped or columns row) into ``groups``, keyed by its id (its location when it has none);
    one left without traces by its flags or ``data.think`` is counted in ``report.emptied`` instead."""
    qid = record.id if record.id is not None else record.location
    if qid in groups:
        raise bad_row(record.location, f"duplicate id '{qid}' (first used at {groups[qid].location})",
                      "give every question a unique id, or merge the two questions", "duplicate_id")
    if not record.traces:
        report.emptied += 1
        return
    record.id = qid
    groups[qid] = record


def merge_trace(loc: str, key: tuple[str, str], qid: str | None, prompt: str | None,
                messages: list[dict[str, str]] | None, answer: str | None, trace: Trace, columns: dict[str, Any],
                groups: dict[Any, QuestionRecord]) -> None:
    """Add one row's trace to its question ``key`` in ``groups`` (flat and chat rows); the rows of one question
    must agree on the question and the answer."""
    record = groups.get(key)
    if record is None:
        groups[key] = QuestionRecord(qid or loc, prompt, messages, answer, [trace], loc, columns)
        return
    name = f"'{qid}'" if qid is not None else "with the same prompt"
    if (record.prompt, record.messages) != (prompt, messages):
        what = f"question {name} conflicts with {record.location} (different prompt/messages)"
        raise bad_row(loc, what, "rows of one question must repeat the same question; fix the text or the id",
                      "conflicting_duplicate")
    if record.answer != answer:
        raise bad_row(loc, f"question {name} conflicts with {record.location} (different answer: "
                      f"{answer!r} vs {record.answer!r})", "rows of one question must have the same answer",
                      "conflicting_duplicate")
    record.traces.append(trace)
