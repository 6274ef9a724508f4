"""Tests of forklight.data.records: loading and validating multi-trace question files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from forklight.data.loading import load_records, parse_record_rows
from forklight.data.records import FieldNames, LoadReport, QuestionRecord, RecordError, Trace
from tests.conftest import GROUPED_ROW, grouped_row, write_jsonl

FLAT = {"id": "q0", "prompt": "1+1?", "answer": "2", "trace": "one plus one is 2"}
MSGS = [{"role": "user", "content": "2+2?"}]


def fl(**changes: Any) -> dict[str, Any]:
    """A flat row with some fields changed (value None removes the field)."""
    row = {**FLAT, "id": "q1", **changes}
    return {k: v for k, v in row.items() if v is not None}


# (case id, rows after the good first row, expected line of the error, key phrase)
BAD_CASES = [
    ("malformed-json", ['{"id": "q1", "prompt": '], 2, "malformed JSON (Expecting value"),
    ("not-object", ["[1, 2]"], 2, "not a JSON object"),
    ("bad-utf8", [b'{"id": "q1", "prompt": "caf\xe9"}'], 2, "not valid UTF-8"),
    ("no-prompt-no-messages", [grouped_row(prompt=None)], 2, "neither 'prompt' nor 'messages'"),
    ("prompt-not-string", [grouped_row(prompt=5)], 2, "'prompt' must be a non-empty string, got int 5"),
    ("prompt-empty", [grouped_row(prompt="  ")], 2, "'prompt' must be a non-empty string"),
    ("messages-not-list", [grouped_row(prompt=None, messages="hi")], 2, "'messages' must be a non-empty list"),
    ("messages-empty", [grouped_row(prompt=None, messages=[])], 2, "got an empty list"),
    ("message-no-content", [grouped_row(prompt=None, messages=[{"role": "user"}])], 2, "messages[0] must be an object"),
    ("traces-missing", [grouped_row(traces=None)], 2, "field 'traces' is missing"),
    ("traces-not-list", [grouped_row(traces="a trace")], 2, "'traces' must be a list of traces, got str"),
    ("traces-empty", [grouped_row(traces=[])], 2, "field 'traces' is an empty list; give at least one trace"),
    ("trace-item-int", [grouped_row(traces=["ok", 3])], 2, "traces[1] must be a non-empty string or an object"),
    ("trace-item-empty", [grouped_row(traces=[""])], 2, "traces[0] must be a non-empty string"),
    ("trace-object-no-text", [grouped_row(traces=[{"source": "t"}])], 2, "with a non-empty string 'text'"),
    ("trace-source-not-str", [grouped_row(traces=[{"text": "t", "source": 1}])], 2, "traces[0].source must be a str"),
    ("answer-list", [grouped_row(answer=[2])], 2, "'answer' must be a string or a number"),
    ("answer-bool", [grouped_row(answer=True)], 2, "'answer' must be a string or a number"),
    ("id-float", [grouped_row(id=1.5)], 2, "'id' must be a non-empty string or an integer"),
    ("grouped-duplicate-id", ["", grouped_row(id="q0")], 3, "duplicate id 'q0' (first used at data.jsonl:1)"),
]
BAD_FLAT_CASES = [
    ("flat-trace-missing", [fl(trace=None)], 2, "field 'trace' is missing"),
    ("flat-trace-empty", [fl(trace="")], 2, "'trace' must be a non-empty string"),
    ("flat-trace-not-str", [fl(trace=["x"])], 2, "'trace' must be a non-empty string, got list"),
    ("flat-source-not-str", [fl(source=7)], 2, "field 'source' must be a string"),
    ("flat-prompt-conflict", [fl(id="q0", prompt="2+2?")], 2, "'q0' conflicts with data.jsonl:1"),
    ("flat-answer-conflict", ["", fl(id="q0", answer="3")], 3, "with data.jsonl:1 (different answer"),
    ("flat-answer-by-prompt", [fl(id=None), fl(id=None, answer="5")], 3, "conflicts with data.jsonl:2"),
]


@pytest.mark.parametrize(
    ("first", "rows", "line", "phrase"),
    [pytest.param(GROUPED_ROW, *c[1:], id=c[0]) for c in BAD_CASES]
    + [pytest.param(FLAT, *c[1:], id=c[0]) for c in BAD_FLAT_CASES],
)
def test_bad_record_message(tmp_path: Path, first: dict, rows: list, line: int, phrase: str) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [first, *rows])
    with pytest.raises(RecordError) as info:
        load_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: "), message  # file name and line number
    assert phrase.replace("data.jsonl", path) in message, message  # other locations named in full
    assert "; " in message, message  # "<location>: <what is wrong>; <how to fix>"


def test_layout_cannot_be_detected(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [{"prompt": "x", "answer": "1"}])
    with pytest.raises(RecordError, match=r"data\.jsonl:1: .*'traces' \(grouped\).*'trace' \(flat\)"):
        load_records(path, on_bad_record="skip")


def test_skip_mode_counts_and_keeps_good_rows(tmp_path: Path) -> None:
    rows = [GROUPED_ROW, "{oops", "", grouped_row(traces=[]), grouped_row(id="q2"), "[]", grouped_row(id="q0"),
            grouped_row(id="q3", answer=4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    records, report = load_records(path, on_bad_record="skip")
    assert [r.id for r in records] == ["q0", "q2", "q3"]
    assert records[2].answer == "4"
    assert report.rows_read == 7 and report.questions == 3 and len(report.skipped) == 4
    assert report.skipped[0].startswith(f"{path}:2: malformed JSON")
    assert report.skipped[1].startswith(f"{path}:4: field 'traces' is an empty list")
    assert report.summary() == "train.jsonl: 7 rows -> 3 questions, 4 skipped"


def test_no_questions_is_an_error_even_when_skipping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "data.jsonl", [grouped_row(traces=[]), grouped_row(traces=None)])
    with pytest.raises(RecordError, match=r"no questions in .*data\.jsonl: 2 rows read, 2 skipped"):
        load_records(path, on_bad_record="skip")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(RecordError, match="no questions in"):
        load_records(str(empty))


def test_bad_arguments_and_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"layout must be one of 'auto', 'grouped', 'flat', 'columns', 'chat', 'prompts', got 'rows'"):
        load_records("x.jsonl", layout="rows")
    with pytest.raises(ValueError, match=r"on_bad_record must be one of 'error', 'skip'"):
        load_records("x.jsonl", on_bad_record="ignore")
    for missing in (tmp_path / "nope.jsonl", tmp_path / "nope"):
        with pytest.raises(RecordError, match=r"nope.*no such file.*\.jsonl, \.json or \.parquet"):
            load_records(str(missing))


def test_grouped_round_trip(tmp_path: Path) -> None:
    rows = [
        {"id": 7, "prompt": "1+1?", "answer": 2, "traces": ["a", {"text": "b", "source": "teacher-2"}],
         "level": 3},
        {"messages": MSGS, "traces": [{"text": "c"}]},
    ]
    path = write_jsonl(tmp_path / "g.jsonl", rows)
    records, report = load_records(path)
    assert records[0] == QuestionRecord(
        id="7", prompt="1+1?", messages=None, answer="2",
        traces=[Trace("a"), Trace("b", "teacher-2")], location=f"{path}:1", columns={"level": 3},
    )
    second = records[1]
    assert second.id == f"{path}:2" and second.prompt is None and second.messages == MSGS
    assert second.answer is None and second.traces == [Trace("c")]
    assert report.rows_read == 2 and report.questions == 2 and report.skipped == []


def test_custom_field_names(tmp_path: Path) -> None:
    names = FieldNames(id="qid", prompt="question", messages="chat", answer="gold", traces="solutions",
                       trace="solution", text="body", source="model")
    rows = [{"qid": "a", "question": "q?", "gold": "x", "solutions": [{"body": "s", "model": "m"}], "id": 1}]
    records, _ = load_records(write_jsonl(tmp_path / "c.jsonl", rows), fields=names)
    assert records[0].id == "a" and records[0].prompt == "q?" and records[0].answer == "x"
    assert records[0].traces == [Trace("s", "m")] and records[0].columns == {"id": 1}
    flat = [{"chat": MSGS, "solution": "s1", "model": "m1"}, {"chat": MSGS, "solution": "s2"}]
    records, _ = load_records(write_jsonl(tmp_path / "f.jsonl", flat), fields=names)
    assert len(records) == 1 and records[0].traces == [Trace("s1", "m1"), Trace("s2")]
    with pytest.raises(RecordError, match="field 'solutions' is missing"):
        load_records(write_jsonl(tmp_path / "x.jsonl", flat), fields=names, layout="grouped")


def test_flat_grouping_by_id(tmp_path: Path) -> None:
    rows = [
        fl(id="b", trace="b1", source="t1", extra=1),
        fl(id=1, trace="one"),
        fl(id="b", trace="b2", extra=2),
        fl(id="1", trace="one again"),
    ]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    records, report = load_records(path, layout="flat")
    assert [r.id for r in records] == ["b", "1"]
    assert records[0].traces == [Trace("b1", "t1"), Trace("b2")]
    assert records[0].location == f"{path}:1" and records[0].columns == {"extra": 1}
    assert [t.text for t in records[1].traces] == ["one", "one again"] and records[1].location == f"{path}:2"
    assert report.summary() == "flat.jsonl: 4 rows -> 2 questions, 0 skipped"


def test_flat_grouping_by_prompt_and_messages(tmp_path: Path) -> None:
    rows = [
        fl(id=None, prompt="p1", trace="x"),
        fl(id=None, prompt=None, messages=MSGS, trace="m1"),
        fl(id=None, prompt="p2", trace="y"),
        fl(id=None, prompt="p1", trace="z"),
        fl(id=None, prompt=None, messages=[dict(m) for m in MSGS], trace="m2"),
    ]
    path = write_jsonl(tmp_path / "flat.jsonl", rows)
    records, _ = load_records(path)
    assert [(r.id, [t.text for t in r.traces]) for r in records] == [
        (f"{path}:1", ["x", "z"]), (f"{path}:2", ["m1", "m2"]), (f"{path}:3", ["y"]),
    ]


def test_json_file(tmp_path: Path) -> None:
    rows = [GROUPED_ROW, grouped_row()]
    for name, data in (("list.json", rows), ("obj.json", {"data": rows, "version": 1})):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        records, report = load_records(str(path))
        assert [r.id for r in records] == ["q0", "q1"] and records[1].location == f"{path}:item 2"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([FLAT, fl(trace="")]))
    with pytest.raises(RecordError, match=r"bad\.json:item 2: field 'trace' must be a non-empty string"):
        load_records(str(bad))
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(RecordError, match=r"bad\.json: top level is dict"):
        load_records(str(bad))


def test_parquet_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    grouped = [
        {"id": "a", "prompt": "p", "answer": "1",
         "traces": [{"text": "t1", "source": "s"}, {"text": "t2", "source": None}]},
        {"id": "b", "prompt": "q", "answer": None, "traces": [{"text": "t3", "source": "s"}]},
    ]
    path = tmp_path / "g.parquet"
    pq.write_table(pa.Table.from_pylist(grouped), path)
    records, report = load_records(str(path))
    assert records[0].traces == [Trace("t1", "s"), Trace("t2")] and records[1].answer is None
    assert records[1].location == f"{path}:row 2"
    assert report.summary() == "g.parquet: 2 rows -> 2 questions, 0 skipped"

    flat = [
        {"prompt": None, "messages": MSGS, "trace": "x", "source": None},
        {"prompt": "p", "messages": None, "trace": "", "source": None},
    ]
    path = tmp_path / "f.parquet"
    pq.write_table(pa.Table.from_pylist(flat), path)
    with pytest.raises(RecordError, match=r"f\.parquet:row 2: field 'trace' must be a non-empty string"):
        load_records(str(path))
    records, report = load_records(str(path), on_bad_record="skip")
    assert records[0].messages == MSGS and records[0].traces == [Trace("x")] and len(report.skipped) == 1

    not_parquet = tmp_path / "junk.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(RecordError, match=r"junk\.parquet: cannot read parquet"):
        load_records(str(not_parquet))


def test_dataset_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config

    # Offline, with the cache in tmp_path; datasets reads these at import time, so patch both.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    write_jsonl(data_dir / "train.jsonl", [GROUPED_ROW, grouped_row(), grouped_row(id="q2", traces=[])])
    with pytest.raises(RecordError, match=rf"{data_dir}\[train\]:row 3: field 'traces' is an empty list"):
        load_records(str(data_dir))
    records, report = load_records(str(data_dir), on_bad_record="skip")
    assert [r.id for r in records] == ["q0", "q1"] and records[1].location == f"{data_dir}[train]:row 2"
    assert records[0].traces == [Trace("one plus one is 2")]
    assert report.summary() == "ds: 3 rows -> 2 questions, 1 skipped"


def test_parse_record_rows_directly() -> None:
    report = LoadReport(path="mem")
    rows = [("mem:1", FLAT), ("mem:2", fl(id="q0", trace="again")), ("mem:3", RecordError("mem:3: bad; fix"))]
    records = parse_record_rows(rows, fields=FieldNames(), layout="auto", on_bad_record="skip", report=report)
    assert len(records) == 1 and len(records[0].traces) == 2
    assert report.rows_read == 3 and report.questions == 1 and report.skipped == ["mem:3: bad; fix"]
    with pytest.raises(ValueError, match="layout"):
        parse_record_rows([], fields=FieldNames(), layout="x", on_bad_record="skip", report=report)


def test_predict_files_may_have_no_traces(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "p1", "prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?"}])
    records, _ = load_records(path, questions_only=True)
    assert [(r.id, r.prompt, r.answer, r.traces) for r in records] == [("p1", "2+2?", "4", []),
                                                                       (f"{path}:2", "3+3?", None, [])]
    with pytest.raises(RecordError, match="cannot tell the layout"):  # training files need traces
        load_records(path)
