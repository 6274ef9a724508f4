"""Loading questions: a source's rows into :class:`~forklight.data.records.QuestionRecord` s, in its layout.

:func:`load_records` reads a file, a local dir or a ``datasets`` name (:func:`~forklight.data.records.read_rows`)
and :func:`parse_record_rows` validates the rows and builds the questions, dispatching on ``data.layout``:
forklight's own ``grouped`` (with optional per-trace keep flags), ``flat`` and ``prompts`` here, the public
corpora's ``columns`` and ``chat`` in :mod:`forklight.data.layouts`, which also applies ``data.think``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from forklight.data.layouts import (
    ThinkMarkup, add_chat_row, add_columns_row, check_column_fields, keep_traces, list_flags, used_columns,
)
from forklight.data.records import (
    LAYOUTS, ON_BAD_RECORD, FieldNames, LoadReport, QuestionRecord, RecordError, Row, add_question, bad_row,
    merge_trace, question_fields, read_rows, show, trace_source,
)
from forklight.errors import ConfigError


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
    _check_choice("layout", layout, LAYOUTS)
    _check_choice("on_bad_record", on_bad_record, ON_BAD_RECORD)
    think = think or ThinkMarkup()
    if layout == "columns" or (layout == "auto" and fields.trace_columns):
        check_column_fields(fields)
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
                add_columns_row(loc, row, fields, think, report, groups)
            elif layout == "chat":
                add_chat_row(loc, row, fields, think, report, groups)
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


def _add_grouped(loc: str, row: Row, f: FieldNames, think: ThinkMarkup, report: LoadReport,
                 groups: dict[Any, QuestionRecord]) -> None:
    """Validate one grouped row (a whole question) and add it to ``groups`` (keyed by id); traces its keep flags,
    finish reasons or ``think`` leave out are counted in ``report`` (a question left with none: ``report.emptied``)."""
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
        candidates.append((text, trace_source(loc, source, f"{f.traces}[{i}].{f.source}"), reason))
    columns = {k: v for k, v in row.items() if k not in used_columns(f) - {f.trace, f.source, f.system}}
    record = QuestionRecord(qid, prompt, messages, answer, keep_traces(loc, candidates, think, report), loc, columns)
    add_question(record, groups, report)


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
    prompt, messages, answer, qid = question_fields(loc, row, f)
    text = row.get(f.trace)
    if text is None:
        raise bad_row(loc, f"field '{f.trace}' is missing", "give the trace text, or pass layout='grouped'", "missing_field")
    if not (isinstance(text, str) and text.strip()):
        raise bad_row(loc, f"field '{f.trace}' must be a non-empty string, got {show(text)}",
                      "fix the trace or remove the row")
    source = trace_source(loc, row.get(f.source), f"field '{f.source}'")
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
