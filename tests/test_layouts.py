"""Tests of the corpus layouts (forklight.data.layouts): each public corpus's own schema, read from a file and through
``datasets.load_dataset`` of a local dir in the hub layout, trained end to end, and its bad data located."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from forklight.cli import main
from forklight.data.layouts import ThinkMarkup, apply_think, final_answer, split_think
from forklight.data.loading import load_records
from forklight.data.records import FieldNames, RecordError
from forklight.errors import ConfigError
from tests.conftest import CONFIGS, REPO, tiny_overrides, write_jsonl

CORPORA = REPO / "tests" / "fixtures" / "corpora"
S1K = FieldNames(prompt="question", answer="solution",
                 trace_columns=["deepseek_thinking_trajectory", "gemini_thinking_trajectory"],
                 attempt_columns=["deepseek_attempt", "gemini_attempt"], keep_columns=["deepseek_grade", "gemini_grade"])
OPENR1 = FieldNames(prompt="problem", messages=None, traces="generations",
                    keep_columns=["correctness_math_verify", "is_reasoning_complete"], finish_reasons="finish_reasons")
OPENTHOUGHTS = FieldNames(messages="conversations")
OT_THINK = ThinkMarkup(open="<|begin_of_thought|>", close="<|end_of_thought|>")
MOT = FieldNames()  # open-r1/Mixture-of-Thoughts: messages in role/content style (the defaults)

# name: (fixture, fields, layout, think, questions, traces per question, dropped (reason, source) counts)
LAYOUTS = {
    "s1k-columns": ("s1k", S1K, "columns", ThinkMarkup(), 4, [2, 2, 1, 2],
                    {("gemini_grade", "gemini_thinking_trajectory"): 1}),
    "openr1-list-flags": ("openr1", OPENR1, "grouped", ThinkMarkup(), 4, [2, 2, 2, 2],
                          {("incomplete", "-"): 1, ("correctness_math_verify", "-"): 1}),
    "openthoughts-from-value": ("openthoughts", OPENTHOUGHTS, "auto", OT_THINK, 4, [2, 2, 2, 2], {}),
    "mixture-role-content": ("mixture_of_thoughts", MOT, "chat", ThinkMarkup(part="answer"), 4, [2, 2, 2, 2], {}),
}


def hub_dir(tmp_path: Path, fixture: str) -> str:
    """The fixture as a hub dataset repository: ``data/train-00000-of-00001.parquet`` + a README with its config."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (CORPORA / fixture / "train.jsonl").read_text().splitlines()]
    directory = tmp_path / f"{fixture}_hub"
    (directory / "data").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), directory / "data" / "train-00000-of-00001.parquet")
    (directory / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n"
                                         "    path: data/train-*\n---\n")
    return str(directory)


@pytest.mark.parametrize("source", ["file", "hub_dir"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_corpus_layout_reads_its_traces_and_counts_what_its_flags_drop(tmp_path, name, source) -> None:
    fixture, fields, layout, think, questions, per_question, dropped = LAYOUTS[name]
    path = str(CORPORA / fixture / "train.jsonl") if source == "file" else hub_dir(tmp_path, fixture)
    records, report = load_records(path, fields=fields, layout=layout, think=think)
    assert len(records) == questions and [len(r.traces) for r in records] == per_question
    assert report.dropped_traces == Counter(dropped)
    assert sum(report.traces_read.values()) == sum(per_question) + sum(dropped.values())
    for record in records:
        assert record.answer is None or record.answer.strip()
        assert record.prompt or (record.messages and record.messages[-1]["role"] == "user")
        for trace in record.traces:
            assert trace.text.strip() and trace.location.startswith(path)


def test_s1k_columns_name_their_source_and_put_the_attempt_after_the_reasoning() -> None:
    records, _ = load_records(str(CORPORA / "s1k" / "train.jsonl"), fields=S1K)  # auto: trace_columns -> columns
    first = records[0]
    assert [t.source for t in first.traces] == ["deepseek_thinking_trajectory", "gemini_thinking_trajectory"]
    assert first.prompt == "What is 12 + 30?" and first.answer == "42"
    assert first.traces[0].text.startswith("<think>\n12 + 30") and first.traces[0].text.endswith("The sum is \\boxed{42}.")
    assert "deepseek_grade" not in first.columns and first.columns["cot_type"] == "math"  # other columns kept
    answers, _ = load_records(str(CORPORA / "s1k" / "train.jsonl"), fields=S1K, think=ThinkMarkup(part="answer"))
    assert answers[0].traces[0].text == "The sum is \\boxed{42}."


def test_chat_layouts_group_conversations_by_question_and_keep_the_system_turn() -> None:
    records, _ = load_records(str(CORPORA / "openthoughts" / "train.jsonl"), fields=OPENTHOUGHTS)
    first = records[0]
    assert [m["role"] for m in first.messages] == ["system", "user"] and first.messages[1]["content"] == "What is 12 + 30?"
    assert first.traces[0].text.startswith("<|begin_of_thought|>")  # think kept as is by default
    stripped, _ = load_records(str(CORPORA / "openthoughts" / "train.jsonl"), fields=OPENTHOUGHTS,
                               think=ThinkMarkup(markup="strip", open=OT_THINK.open, close=OT_THINK.close))
    assert "<|begin_of_thought|>" not in stripped[0].traces[0].text
    assert stripped[0].traces[0].text.startswith("12 + 30: add the tens")


@pytest.mark.parametrize(("think", "expected"), [
    (ThinkMarkup(), ("<think>\nr\n</think>\n\na", None)),
    (ThinkMarkup(markup="strip"), ("r\n\na", None)),
    (ThinkMarkup(part="reasoning"), ("<think>\nr\n</think>", None)),
    (ThinkMarkup(markup="strip", part="reasoning"), ("r", None)),
    (ThinkMarkup(part="answer"), ("a", None)),
])
def test_think_markup_keeps_or_strips_the_block_and_keeps_a_part(think, expected) -> None:
    assert apply_think("<think>\nr\n</think>\n\na", think) == expected


def test_think_markup_on_unclosed_and_unmarked_traces() -> None:
    assert apply_think("<think>\nstill thinking", ThinkMarkup(part="answer")) == ("", "incomplete")
    assert apply_think("<think>\nstill thinking", ThinkMarkup()) == ("<think>\nstill thinking", None)  # kept as read
    assert apply_think("no markup at all", ThinkMarkup(part="answer")) == ("no markup at all", None)
    assert apply_think("<think>r</think>", ThinkMarkup(part="answer")) == ("", "empty")
    assert split_think("x</think> y").closed and not split_think("<think>x").closed
    assert final_answer("<think>a \\boxed{1}</think> \\boxed{2}") == "\\boxed{2}" and final_answer("\\boxed{3}") == "\\boxed{3}"
    with pytest.raises(ConfigError, match="data.think.part must be one of"):
        ThinkMarkup(part="final")


def test_a_question_that_loses_every_trace_to_its_flags_is_counted_not_an_error(tmp_path) -> None:
    rows = [{"problem": "1+1?", "answer": "2", "generations": ["2", "3"], "ok": [True, False]},
            {"problem": "2+2?", "answer": "4", "generations": ["5"], "ok": [False]}]
    records, report = load_records(write_jsonl(tmp_path / "d.jsonl", rows),
                                   fields=FieldNames(prompt="problem", traces="generations", keep_columns=["ok"]))
    assert [r.answer for r in records] == ["2"] and report.emptied == 1 and report.dropped_traces == {("ok", "-"): 2}


# ---- bad data: located errors ---------------------------------------------------------------------------------
def test_bad_corpus_data_gets_located_errors(tmp_path) -> None:
    s1k = json.loads((CORPORA / "s1k" / "train.jsonl").read_text().splitlines()[0])
    path = write_jsonl(tmp_path / "s1k.jsonl", [s1k])
    typo = FieldNames(prompt="question", answer="solution", trace_columns=["deepseek_thinking_trajectory", "claude_trace"])
    with pytest.raises(RecordError, match=rf"{path}:1: column 'claude_trace' \(data.fields.trace_columns\[1\]\) does "
                                          "not exist; the row has: cot_type, deepseek_attempt"):
        load_records(path, fields=typo)
    with pytest.raises(ConfigError, match="data.fields.keep_columns has 1 columns for 2 data.fields.trace_columns"):
        load_records(path, fields=FieldNames(prompt="question", answer="solution", keep_columns=["deepseek_grade"],
                                             trace_columns=["deepseek_thinking_trajectory", "gemini_thinking_trajectory"]))
    bad_grade = write_jsonl(tmp_path / "grade.jsonl", [{**s1k, "gemini_grade": "Maybe"}])
    with pytest.raises(RecordError, match=rf"{bad_grade}:1: column 'gemini_grade' must be a keep flag"):
        load_records(bad_grade, fields=S1K)

    openr1 = json.loads((CORPORA / "openr1" / "train.jsonl").read_text().splitlines()[1])
    short = write_jsonl(tmp_path / "openr1.jsonl", [{**openr1, "correctness_math_verify": [True]}])
    with pytest.raises(RecordError, match=rf"{short}:1: column 'correctness_math_verify' \(data.fields.keep_columns\) "
                                          r"has 1 flags for 3 traces in 'generations'; give one flag per trace"):
        load_records(short, fields=OPENR1)
    both = write_jsonl(tmp_path / "both.jsonl", [openr1])
    with pytest.raises(RecordError, match="given twice, as 'problem' and as 'messages'; keep one: set "
                                          "data.fields.messages: null"):
        load_records(both, fields=FieldNames(prompt="problem", traces="generations"))

    chat = [{"conversations": [{"from": "user", "value": "1+1?"}, {"from": "assistant", "value": "2"}]},
            {"conversations": [{"from": "user", "value": "2+2?"}]}]
    no_answer = write_jsonl(tmp_path / "chat.jsonl", chat)
    with pytest.raises(RecordError, match=rf"{no_answer}:2: the conversation in 'conversations' has no assistant turn"):
        load_records(no_answer, fields=OPENTHOUGHTS)
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"conversations": [{"from": "user", "value": "1+1?"},
                                                                  {"from": "narrator", "value": "2"}]}])
    with pytest.raises(RecordError, match=rf"{odd}:1: conversations\[1\] has role 'narrator'"):
        load_records(odd, fields=OPENTHOUGHTS, layout="chat")
    records, report = load_records(no_answer, fields=OPENTHOUGHTS, on_bad_record="skip")
    assert len(records) == 1 and report.skip_reasons == {"no_trace": 1}


# ---- each layout trains end to end -----------------------------------------------------------------------------
LAYOUT_CONFIGS = {  # the shipped data overlays (configs/data/), on the fixtures
    "s1k-columns": ["-c", str(CONFIGS / "data" / "s1k.yaml")],
    "openr1-list-flags": ["-c", str(CONFIGS / "data" / "openr1.yaml"), "--data.init_args.think.part=answer"],
    "openthoughts-from-value": ["-c", str(CONFIGS / "data" / "openthoughts.yaml")],
    "mixture-role-content": ["-c", str(CONFIGS / "data" / "chat.yaml")],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_trains_end_to_end(tmp_path, name, caplog) -> None:
    fixture = LAYOUTS[name][0]
    train = hub_dir(tmp_path, fixture) if name == "openr1-list-flags" else CORPORA / fixture / "train.jsonl"
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *LAYOUT_CONFIGS[name], *tiny_overrides(tmp_path),
          f"--data.init_args.train={train}", "--data.init_args.max_length=256", "--trainer.limit_val_batches=0"])
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints, f"no checkpoint written under {tmp_path}"
    import torch

    state = torch.load(checkpoints[0], weights_only=False, map_location="cpu")
    assert state["global_step"] == 2
    assert state["datamodule_hyper_parameters"]["train"] == str(train)
    if name == "openr1-list-flags":  # what the corpus's flags left out is in the printed validation summary
        assert "train: 4 questions; traces left out by the data's flags or data.think: 1 correctness_math_verify, " \
               "1 incomplete" in caplog.text
