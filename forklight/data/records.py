"""Question records: the typed form every input layout is read into, with validation.

A record is one question with its set of correct reasoning traces. Files are read in one
of these layouts (DESIGN.md §3), field names mapped by :class:`FieldNames`:

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
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING

from forklight.errors import ConfigError, UserError

if TYPE_CHECKING:
    from forklight.data.layouts import ThinkMarkup


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


def load_records(
    path: str, *, fields: FieldNames | None = None, layout: str = "auto", on_bad_record: str = "error",
    split: str = "train", questions_only: bool = False, think: ThinkMarkup | None = None,
) -> tuple[list[QuestionRecord], LoadReport]:
    """Read and validate the questions of ``path`` (.jsonl, .json, .parquet, directory or dataset name).

    ``layout`` is "auto" (decided by the first row: ``fields.trace_columns`` set -> columns, ``fields.traces``
    -> grouped, ``fields.trace`` -> flat, ``fields.messages`` with an assistant turn -> chat), or one of
    :data:`LAYOUTS`. ``think`` (``data.think``) keeps or strips the traces' think markup. ``on_bad_record`` is "error" (raise :class:`RecordError` on the
    first bad row) or "skip" (note it in ``report.skipped`` and go on). A source with no valid
    question raises :class:`RecordError` in both modes. ``questions_only`` (``forklight predict``)
    also accepts rows without traces (the ``prompts`` layout: id, prompt or messages, optional answer).
    """
    report = LoadReport(path=path)  # the arguments are checked by parse_record_rows, before any reading
    records = parse_record_rows(
        read_rows(path, split), fields=fields or FieldNames(), layout=layout,
        on_bad_record=on_bad_record, report=report, questions_only=questions_only, think=think,
    )
    if not records:
        first = f" (first problem: {report.skipped[0]})" if report.skipped else ""
        if report.emptied:
            first += (f"; {report.emptied} questions lost every trace to the data's keep flags or data.think "
                      f"({', '.join(f'{n} {r}' for (r, _), n in report.dropped_traces.most_common(3))})")
        raise RecordError(
            f"no questions in {path}: {report.rows_read} rows read, {len(report.skipped)} skipped{first}; "
            "check the file, its layout and the configured field names"
        )
    return records, report


def parse_record_rows(
    rows: Iterable[tuple[str, Row | RecordError]], *, fields: FieldNames, layout: str, on_bad_record: str,
    report: LoadReport, questions_only: bool = False, think: ThinkMarkup | None = None,
) -> list[QuestionRecord]:
    """Validate ``(location, row)`` pairs and build the questions, in first-appearance order.

    A row may also be a :class:`RecordError` (a line the reader could not decode); it is raised or
    skipped like any bad row. Failing to detect the layout in "auto" mode always raises. Traces the
    data's own flags or ``think`` leave out are counted in ``report`` (not bad records).
    """
    from forklight.data import layouts  # it builds on this module

    _check_choice("layout", layout, LAYOUTS)
    _check_choice("on_bad_record", on_bad_record, ON_BAD_RECORD)
    think = think or layouts.ThinkMarkup()
    if layout == "columns" or (layout == "auto" and fields.trace_columns):
        layouts.check_column_fields(fields)
    groups: dict[Any, QuestionRecord] = {}
    for loc, row in rows:
        report.rows_read += 1
        if layout == "auto" and isinstance(row, dict):
            layout = _detect_layout(loc, row, fields, questions_only)
        try:
            if isinstance(row, RecordError):
                raise row
            if not isinstance(row, dict):
                raise bad_row(loc, f"row is {show(row)}, not a JSON object", "write one object per row", "not_an_object")
            if layout == "flat":
                _add_flat(loc, row, fields, think, report, groups)
            elif layout == "prompts":
                _add_prompt(loc, row, fields, groups)
            elif layout == "columns":
                layouts.add_columns_row(loc, row, fields, think, report, groups)
            elif layout == "chat":
                layouts.add_chat_row(loc, row, fields, think, report, groups, merge_trace)
            else:
                _add_grouped(loc, row, fields, think, report, groups)
        except RecordError as err:
            if on_bad_record == "error":
                raise
            report.skipped.append(str(err))
            report.skip_reasons[err.reason] += 1
    report.emptied += len(report.dropped_keys - set(groups))
    report.questions = len(groups)
    return list(groups.values())


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


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


def _detect_layout(loc: str, row: Row, f: FieldNames, questions_only: bool = False) -> str:
    if f.trace_columns:
        return "columns"
    if f.traces in row:
        return "grouped"
    if f.trace in row:
        return "flat"
    turns = row.get(f.messages)
    if not questions_only and isinstance(turns, list) and any(
            isinstance(t, dict) and (t.get("role") or t.get("from")) in ("assistant", "gpt") for t in turns):
        return "chat"
    if questions_only:
        return "prompts"
    raise bad_row(loc, f"cannot tell the layout: the first row has neither '{f.traces}' (grouped) nor "
                  f"'{f.trace}' (flat) nor a conversation with an assistant turn in '{f.messages}' (chat)",
                  "add one of them, set the trace field names (data.fields) or set data.layout", "unknown_layout")


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


def _source(loc: str, value: Any, what: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise bad_row(loc, f"{what} must be a string, got {show(value)}", "name the teacher as a string")
    return value


def _add_grouped(loc: str, row: Row, f: FieldNames, think: ThinkMarkup, report: LoadReport,
                 groups: dict[Any, QuestionRecord]) -> None:
    """Validate one grouped row (a whole question) and add it to ``groups`` (keyed by id); traces its keep flags,
    finish reasons or ``think`` leave out are counted in ``report`` (a question left with none: ``report.emptied``)."""
    from forklight.data.layouts import keep_traces, list_flags, used_columns

    prompt, messages, answer, qid = question_fields(loc, row, f)
    items = row.get(f.traces)
    fix = "give at least one trace or remove the question"
    if items is None:
        raise bad_row(loc, f"field '{f.traces}' is missing", f"{fix} (flat files: pass layout='flat')", "missing_field")
    if not isinstance(items, list):
        raise bad_row(loc, f"field '{f.traces}' must be a list of traces, got {show(items)}", fix)
    if not items:
        raise bad_row(loc, f"field '{f.traces}' is an empty list", fix, "empty_traces")
    candidates = []
    for i, (item, reason) in enumerate(zip(items, list_flags(loc, row, f, len(items)))):
        text = item.get(f.text) if isinstance(item, dict) else item
        if not (isinstance(text, str) and text.strip()):
            raise bad_row(loc, f"{f.traces}[{i}] must be a non-empty string or an object with a non-empty "
                          f"string '{f.text}', got {show(item)}", "fix or remove this trace")
        source = item.get(f.source) if isinstance(item, dict) else None
        candidates.append((text, _source(loc, source, f"{f.traces}[{i}].{f.source}"), reason))
    columns = {k: v for k, v in row.items() if k not in used_columns(f) - {f.trace, f.source, f.system}}
    record = QuestionRecord(qid, prompt, messages, answer, keep_traces(loc, candidates, think, report), loc, columns)
    add_question(record, groups, report)


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


def _add_prompt(loc: str, row: Row, f: FieldNames, groups: dict[Any, QuestionRecord]) -> None:
    """Validate one question without traces (a ``forklight predict`` input) and add it to ``groups``."""
    prompt, messages, answer, qid = question_fields(loc, row, f)
    qid = qid if qid is not None else loc
    if qid in groups:
        raise bad_row(loc, f"duplicate id '{qid}' (first used at {groups[qid].location})",
                   "give every question a unique id", "duplicate_id")
    columns = {k: v for k, v in row.items() if k not in (f.id, f.prompt, f.messages, f.answer)}
    groups[qid] = QuestionRecord(qid, prompt, messages, answer, [], loc, columns)


def _add_flat(loc: str, row: Row, f: FieldNames, think: ThinkMarkup, report: LoadReport,
              groups: dict[Any, QuestionRecord]) -> None:
    """Validate one flat row (one trace) and merge it into its question in ``groups``."""
    from forklight.data.layouts import keep_traces

    prompt, messages, answer, qid = question_fields(loc, row, f)
    text = row.get(f.trace)
    if text is None:
        raise bad_row(loc, f"field '{f.trace}' is missing", "give the trace text, or pass layout='grouped'", "missing_field")
    if not (isinstance(text, str) and text.strip()):
        raise bad_row(loc, f"field '{f.trace}' must be a non-empty string, got {show(text)}",
                      "fix the trace or remove the row")
    source = _source(loc, row.get(f.source), f"field '{f.source}'")
    if qid is not None:
        key: tuple[str, str] = ("id", qid)
    else:
        key = ("prompt", prompt) if prompt is not None else ("messages", json.dumps(messages))
    traces = keep_traces(loc, [(text, source, None)], think, report)
    if not traces:
        report.dropped_keys.add(key)
        return
    known = (f.id, f.prompt, f.messages, f.answer, f.trace, f.source)
    columns = {k: v for k, v in row.items() if k not in known}
    merge_trace(loc, key, qid, prompt, messages, answer, traces[0], columns, groups)


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
