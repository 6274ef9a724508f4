"""``forklight prepare``: verification, duplicates, min/max traces, the report by hand, parallel = serial, the output
read back by ``load_records`` and trained on by ``forklight fit``, located errors; through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from forklight import prepare as prepare_module
from forklight.cli import build_cli, main
from forklight.data.loading import load_records
from forklight.data.records import Trace
from forklight.errors import ConfigError, UserError
from forklight.prepare import PrepareConfig, drop_duplicates, jaccard, select_traces, shingles
from tests.conftest import CONFIGS, REPO, tiny_overrides, write_jsonl

# Math answers the verifier must read: a boxed answer after the think block (a boxed answer inside it does not count),
# an equivalent form (24/2), chat messages as the question, a trace without a source, a question without a gold answer.
MATH_ROWS = [
    {"id": "sum", "prompt": "What is 5+7?", "answer": "12", "level": 1, "traces": [
        {"text": "<think>5 plus 7 is 12</think> The answer is \\boxed{12}.", "source": "alice"},
        {"text": "<think>5 plus 7 is 13</think> \\boxed{13}", "source": "bob"},
        {"text": "<think>seven and five make twelve</think> Final: \\boxed{12}", "source": "bob"},
        {"text": "<think>maybe \\boxed{12}</think> no, \\boxed{13}", "source": "carol"},
        {"text": "<think>twice six</think> \\boxed{\\frac{24}{2}}", "source": "carol"}]},
    {"id": "product", "messages": [{"role": "user", "content": "What is 2*3?"}], "answer": "6", "level": 2,
     "traces": [{"text": "\\boxed{6}", "source": "alice"}, "2*3 = \\boxed{6}", {"text": "\\boxed{7}", "source": "bob"}]},
    {"id": "no_gold", "prompt": "Guess?", "level": 3, "traces": [{"text": "\\boxed{1}", "source": "alice"},
                                                                 {"text": "\\boxed{2}", "source": "bob"}]},
    {"id": "one_right", "prompt": "What is 1+1?", "answer": "2", "level": 4,
     "traces": [{"text": "\\boxed{2}", "source": "alice"}, {"text": "\\boxed{3}", "source": "carol"}]},
]


def run_prepare(tmp_path: Path, rows: list, *options: str, name: str = "out") -> dict:
    """``forklight prepare`` on ``rows`` (a grouped jsonl) -> ``tmp_path/<name>/train.parquet``; its report.json."""
    corpus = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    output = tmp_path / name / "train.parquet"
    main(["prepare", f"--input={corpus}", f"--output={output}", "--progress=false", *options])
    return json.loads((output.parent / "report.json").read_text())


def kept_traces(tmp_path: Path, name: str = "out") -> dict[str, list[tuple[str, str | None]]]:
    records, _ = load_records(str(tmp_path / name / "train.parquet"))
    return {record.id: [(trace.text, trace.source) for trace in record.traces] for record in records}


def test_verification_drops_wrong_traces_and_questions_without_gold_counted_per_source(tmp_path):
    report = run_prepare(tmp_path, MATH_ROWS)
    assert kept_traces(tmp_path) == {
        "sum": [(MATH_ROWS[0]["traces"][i]["text"], source) for i, source in ((0, "alice"), (2, "bob"), (4, "carol"))],
        "product": [("\\boxed{6}", "alice"), ("2*3 = \\boxed{6}", None)],
    }
    sources = report["sources"]
    assert {name: (s["read"], s["kept"], s["dropped"]) for name, s in sources.items()} == {
        "-": (1, 1, {}),
        "alice": (4, 2, {"missing_answer": 1, "too_few_traces": 1}),
        "bob": (4, 1, {"missing_answer": 1, "wrong": 2}),
        "carol": (3, 1, {"wrong": 2}),
    }
    assert report["questions_read"] == 4 and report["questions_kept"] == 2
    assert report["questions_dropped"] == {"missing_answer": 1, "too_few_traces": 1}
    assert report["traces_per_question"] == {"2": 1, "3": 1}


def picky(completions, answers, **columns):
    """A user verifier: None (cannot score) for a completion saying "unsure", else whether it ends with the answer;
    it also receives the record's other columns, one value per completion."""
    assert all(len(values) == len(completions) for values in columns.values()) and "level" in columns
    return [None if "unsure" in c else float(c.rstrip(".").endswith(a)) for c, a in zip(completions, answers)]


def test_a_user_verifier_sees_the_columns_and_its_none_is_unscorable(tmp_path):
    rows = [{"id": "a", "prompt": "p", "answer": "7", "level": 1, "traces": [
                {"text": "so 7", "source": "s"}, {"text": "unsure, 7", "source": "s"}, {"text": "it is 7.", "source": "t"}]},
            {"id": "b", "prompt": "q", "answer": "8", "level": 2, "traces": [
                {"text": "unsure", "source": "s"}, {"text": "unsure again", "source": "t"}]}]
    report = run_prepare(tmp_path, rows, "--verifier=tests.test_prepare:picky")
    assert kept_traces(tmp_path) == {"a": [("so 7", "s"), ("it is 7.", "t")]}
    assert report["sources"]["s"]["dropped"] == {"unscorable": 2} and report["sources"]["t"]["dropped"] == {"unscorable": 1}
    assert report["questions_dropped"] == {"unscorable_answer": 1}  # no trace scorable: the gold answer, most likely


WORDS = [f"w{i}" for i in range(40)]
TEXT = " ".join(WORDS)  # 40 distinct words: 36 five-word shingles
LAST_CHANGED = " ".join(WORDS[:-1] + ["end"])  # 35 shared shingles of 37: J = 35/37 = 0.946
MIDDLE_CHANGED = " ".join(WORDS[:20] + ["mid"] + WORDS[21:])  # the 5 windows over word 20 differ: J = 31/41 = 0.756


def test_shingle_jaccard_by_hand():
    assert len(shingles(TEXT)) == 36
    assert jaccard(shingles(TEXT), shingles(LAST_CHANGED)) == pytest.approx(35 / 37)
    assert jaccard(shingles(TEXT), shingles(MIDDLE_CHANGED)) == pytest.approx(31 / 41)
    assert shingles("so 12") == {("so", "12")}  # shorter than 5 words: the whole text is one shingle


@pytest.mark.parametrize(("near_duplicate", "kept"), [
    ("0.9", ["alice", "dave", "erin"]), ("0.7", ["alice", "erin"]), ("null", ["alice", "carol", "dave", "erin"])])
def test_exact_and_near_duplicates_are_dropped_keeping_the_first(tmp_path, near_duplicate, kept):
    traces = [{"text": TEXT, "source": "alice"}, {"text": "  " + TEXT.replace(" ", " \n\t "), "source": "bob"},
              {"text": LAST_CHANGED, "source": "carol"}, {"text": MIDDLE_CHANGED, "source": "dave"},
              {"text": "something else entirely", "source": "erin"}]
    report = run_prepare(tmp_path, [{"id": "q", "prompt": "p", "traces": traces}], "--verifier=null",
                         f"--near_duplicate={near_duplicate}")
    assert [source for _, source in kept_traces(tmp_path)["q"]] == kept
    dropped = {name: s["dropped"] for name, s in report["sources"].items() if s["dropped"]}
    assert dropped["bob"] == {"duplicate": 1}  # whitespace differs only
    assert dropped.get("carol") == (None if near_duplicate == "null" else {"near_duplicate": 1})
    assert dropped.get("dave") == ({"near_duplicate": 1} if near_duplicate == "0.7" else None)


def test_min_and_max_traces_prefer_distinct_sources(tmp_path):
    rows = [{"id": "q1", "prompt": "p", "traces": [{"text": f"a{i}", "source": "a"} for i in range(3)]
             + [{"text": "b0", "source": "b"}, {"text": "c0", "source": "c"}]},
            {"id": "q2", "prompt": "p", "traces": [{"text": "a0", "source": "a"}, {"text": "a1", "source": "a"},
                                                   {"text": "b0", "source": "b"}, {"text": "b1", "source": "b"}]},
            {"id": "q3", "prompt": "p", "traces": [{"text": "a0", "source": "a"}]}]
    report = run_prepare(tmp_path, rows, "--verifier=null", "--max_traces=3")
    assert kept_traces(tmp_path) == {"q1": [("a0", "a"), ("b0", "b"), ("c0", "c")],  # one per source first,
                                     "q2": [("a0", "a"), ("a1", "a"), ("b0", "b")]}  # then a second turn, in order
    assert report["sources"]["a"]["dropped"] == {"too_few_traces": 1, "over_max_traces": 2}
    assert report["sources"]["b"]["dropped"] == {"over_max_traces": 1}
    assert report["questions_dropped"] == {"too_few_traces": 1}
    assert select_traces([Trace("x", None), Trace("y", None), Trace("z", "s")], 2)[0] == [Trace("x", None),
                                                                                         Trace("z", "s")]
    assert drop_duplicates([Trace("a b", "s"), Trace("a  b", "t")], None)[1] == [(Trace("a  b", "t"), "duplicate")]


def test_the_report_by_hand(tmp_path):
    rows = [{"id": "q1", "prompt": "p", "answer": "1", "traces": [
                {"text": "a" * 10, "source": "x"}, {"text": "b" * 20, "source": "x"}, {"text": "c" * 6, "source": "y"}]},
            {"id": "q2", "prompt": "p", "traces": [{"text": "d" * 30, "source": "x"}, {"text": "d" * 30, "source": "y"}]},
            "{",  # malformed: skipped and counted
            {"id": "q3", "prompt": "p", "traces": [{"text": "e" * 40, "source": "x"}, {"text": "f" * 8, "source": "y"},
                                                   "g" * 5]}]
    report = run_prepare(tmp_path, rows, "--verifier=null", "--near_duplicate=null", "--max_traces=2",
                         "--on_bad_record=skip", "--tokenizer=toy")
    # q1: x a10 and y c6 kept, x b20 over the cap; q2: y's copy a duplicate, x alone too few; q3: x e40, y f8 kept
    assert (report["questions_read"], report["questions_kept"], report["questions_dropped"]) == (3, 2, {"too_few_traces": 1})
    assert report["traces_per_question"] == {"2": 2}
    assert (report["skipped_rows"], report["skip_reasons"]) == (1, {"malformed_json": 1})
    x, y, none = report["sources"]["x"], report["sources"]["y"], report["sources"]["-"]
    assert (x["read"], x["kept"], x["dropped"], x["acceptance_rate"]) == (4, 2, {"too_few_traces": 1, "over_max_traces": 1}, 0.5)
    assert (y["read"], y["kept"], y["dropped"], y["acceptance_rate"]) == (3, 2, {"duplicate": 1}, 0.6667)
    assert (none["read"], none["kept"], none["dropped"], none["acceptance_rate"]) == (1, 0, {"over_max_traces": 1}, 0.0)
    assert x["chars"] == {"mean": 25.0, "median": 25.0, "p90": 40, "max": 40}  # 10, 40; p90 = 2nd of 2 (nearest rank)
    assert y["chars"] == {"mean": 7.0, "median": 7.0, "p90": 8, "max": 8}
    assert x["tokens"] == x["chars"] and y["tokens"] == y["chars"]  # the toy tokenizer: one token per character
    assert none["chars"] is None
    assert report["options"]["max_traces"] == 2 and report["forklight_version"]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "| source | read | kept | acceptance | duplicate | too_few_traces | over_max_traces |" in markdown
    assert "| x | 4 | 2 | 50.0% | 0 | 1 | 1 | 25 / 25 / 40 / 40 | 25 / 25 / 40 / 40 |" in markdown
    assert "1 rows skipped (1 malformed_json)" in markdown


@pytest.mark.slow
def test_two_worker_processes_write_the_same_parquet_as_one(tmp_path, monkeypatch):
    monkeypatch.setattr("forklight.prepare.curate.CHUNK_QUESTIONS", 1)  # four chunks over two workers
    reports = [run_prepare(tmp_path, MATH_ROWS, f"--num_proc={n}", name=f"proc{n}") for n in (1, 2)]
    tables = [pq.read_table(tmp_path / f"proc{n}" / "train.parquet").replace_schema_metadata(None) for n in (1, 2)]
    assert tables[0].num_rows == 2 and tables[0].equals(tables[1])
    for report in reports:
        del report["options"], report["input"], report["output"]
    assert reports[0] == reports[1]


@pytest.mark.slow
def test_the_output_reads_back_and_trains_through_forklight_fit(tmp_path):
    # toy tokenizer's alphabet; math-verify reads the last number; one question asked as chat messages
    rows = [{"id": f"q{k}", "prompt": f"{k}+{k + 1}=?", "answer": str(2 * k + 1), "meta": {"level": k, "tags": ["sum"]},
             "traces": [{"text": f"{k} plus {k + 1} is {2 * k + 1}", "source": "column"},
                        {"text": f"count up: {2 * k + 1}", "source": "running"}, f"so {2 * k + 1}",
                        {"text": f"so {2 * k}", "source": "running"}]} for k in range(1, 7)]
    rows[0] = {**{k: v for k, v in rows[0].items() if k != "prompt"}, "messages": [{"role": "user", "content": "1+2=?"}]}
    run_prepare(tmp_path, rows)
    output = tmp_path / "out" / "train.parquet"
    records, _ = load_records(str(output))
    assert [r.id for r in records] == [f"q{k}" for k in range(1, 7)]
    assert records[0].messages == [{"role": "user", "content": "1+2=?"}] and records[0].prompt is None
    assert records[1].prompt == "2+3=?" and records[1].messages is None and records[1].answer == "5"
    assert [(t.text, t.source) for t in records[1].traces] == [("2 plus 3 is 5", "column"), ("count up: 5", "running"),
                                                              ("so 5", None)]  # "so 4" is wrong
    assert records[1].columns == {"meta": {"level": 2, "tags": ["sum"]}}
    cli = build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--data.init_args.train={output}",
                     "--data.init_args.val_size=2", "--data.init_args.batch_size=2"])
    assert cli.trainer.global_step == 2


def test_bad_options_are_errors_naming_their_key(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", MATH_ROWS)
    base = ["prepare", f"--input={corpus}", f"--output={tmp_path / 'out.parquet'}", "--progress=false"]
    for option, message in [("--min_traces=0", "min_traces must be >= 1"),
                            ("--max_traces=1", "max_traces=1 is below min_traces=2"),
                            ("--near_duplicate=1.5", "near_duplicate must be in (0, 1]"),
                            ("--num_proc=0", "num_proc must be >= 1"),
                            ("--layout=weird", "layout must be one of"),
                            ("--on_bad_record=ignore", "on_bad_record must be one of"),
                            ("--think.markup=bad", "think.markup must be one of"),
                            ("--verifier=nope", "verifier='nope' is neither"),
                            (f"--output={tmp_path / 'out.jsonl'}", "output must end in .parquet")]:
        with pytest.raises(ConfigError) as error:
            main([*base, option])
        assert str(error.value).startswith(message), (option, str(error.value))
    assert not (tmp_path / "out.parquet").exists()


def test_a_user_error_is_one_located_line_and_exit_status_2(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [MATH_ROWS[0], '{"id": "x", "prompt": '])
    command = [sys.executable, "-m", "forklight.prepare", f"--input={corpus}", f"--output={tmp_path / 'o.parquet'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "FORKLIGHT_DEBUG": "0"})
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"forklight: error: {corpus}:2: malformed JSON")


def test_an_existing_output_is_kept_unless_overwrite(tmp_path):
    run_prepare(tmp_path, MATH_ROWS, "--verifier=null")
    output = tmp_path / "out" / "train.parquet"
    before = pq.read_table(output).num_rows
    with pytest.raises(ConfigError, match="already exists; give another output, or set overwrite: true"):
        run_prepare(tmp_path, MATH_ROWS)
    assert pq.read_table(output).num_rows == before == 4
    run_prepare(tmp_path, MATH_ROWS, "--overwrite=true")
    assert pq.read_table(output).num_rows == 2 and not list(output.parent.glob("*.partial-*"))


def test_nothing_kept_writes_the_report_but_no_parquet(tmp_path):
    with pytest.raises(UserError, match="no question kept .*1 too_few_traces"):
        run_prepare(tmp_path, [MATH_ROWS[3]])
    assert (tmp_path / "out" / "report.md").exists() and not (tmp_path / "out" / "train.parquet").exists()


def test_columns_not_written_are_listed_and_mixed_types_are_an_error(tmp_path):
    rows = [{**row, "traces": row["traces"][:2]} for row in MATH_ROWS[:2]]
    rows[1]["level"] = "two"
    with pytest.raises(UserError, match="column 'level' cannot be written to parquet .* add it to drop_columns"):
        run_prepare(tmp_path, rows, "--verifier=null")
    report = run_prepare(tmp_path, [{**row, "solution": "s"} for row in rows], "--verifier=null",
                         "--drop_columns=[level]", name="dropped")
    assert report["dropped_columns"] == {"level": "drop_columns"}
    assert pq.read_schema(tmp_path / "dropped" / "train.parquet").names == ["id", "prompt", "messages", "answer",
                                                                           "traces", "solution"]


@dataclass
class FakeSampleReport:
    generated: int

    @property
    def dropped(self) -> Counter:  # as forklight.teachers.SampleReport: samples left out, by (reason, teacher)
        return Counter({("incomplete", "teacher"): 1})


def test_the_sampling_seam_hands_the_records_to_forklight_teachers(tmp_path, monkeypatch):
    calls = []

    def sample_traces(records, sampling, store_dir, progress):
        calls.append((sampling, store_dir, progress))
        for record in records:
            record.traces.append(Trace(f"teacher says \\boxed{{{record.answer}}}", "teacher"))
        return records, FakeSampleReport(len(records))

    monkeypatch.setitem(sys.modules, "forklight.teachers", types.SimpleNamespace(sample_traces=sample_traces))
    output = tmp_path / "out.parquet"
    report = prepare_module.prepare(PrepareConfig(input=write_jsonl(tmp_path / "in.jsonl", MATH_ROWS[:2]),
                                                  output=str(output), sample={"teachers": ["t"]}, progress=False))
    assert calls == [({"teachers": ["t"]}, f"{output}.samples", False)]  # before verification: the teacher's are verified
    teacher = report.sources["teacher"]
    assert (teacher.read, teacher.sampled, teacher.kept, teacher.dropped) == (3, 3, 2, {"incomplete": 1})
    assert report.sampling == {"generated": 2}


@pytest.mark.parametrize("name", sorted(path.name for path in (CONFIGS / "prepare").glob("*.yaml")))
def test_shipped_prepare_configs_open_with_their_command_and_parse(name, capsys):
    path = CONFIGS / "prepare" / name
    assert path.read_text().startswith(f"# forklight prepare -c configs/prepare/{name}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "-c", str(path), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["output"].endswith(".parquet") and printed["fields"]["trace_columns" if name == "s1k.yaml" else "traces"]


def test_configs_stack_and_options_override(tmp_path, capsys):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("min_traces: 3\nfields:\n  answer: gold\n")
    with pytest.raises(SystemExit):
        main(["prepare", "-c", str(CONFIGS / "prepare" / "s1k.yaml"), "-c", str(overlay), "--max_traces=4",
              "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["min_traces"], printed["max_traces"], printed["fields"]["answer"]) == (3, 4, "gold")
    assert printed["fields"]["prompt"] == "question" and printed["layout"] == "columns"  # the rest of s1k.yaml


@pytest.mark.slow
def test_the_shipped_four_teacher_fixture_curates_and_trains(tmp_path, monkeypatch):
    """configs/prepare/fixture.yaml on tests/fixtures/corpora/multi_teacher/: the README's path, offline."""
    monkeypatch.chdir(REPO)  # the config names the fixture relative to the repository
    output = tmp_path / "fixture" / "train.parquet"
    main(["prepare", "-c", str(CONFIGS / "prepare" / "fixture.yaml"), f"--output={output}", "--progress=false"])
    report = json.loads((tmp_path / "fixture" / "report.json").read_text())
    assert (report["questions_read"], report["questions_kept"]) == (6, 5)
    dropped = {source: counts["dropped"] for source, counts in report["sources"].items()}
    assert dropped == {"deepseek_r1_thinking_trajectory": {"too_few_traces": 1},
                       "gemini_flash_thinking_trajectory": {"wrong": 2, "incomplete": 1},
                       "claude_opus_thinking_trajectory": {"wrong": 1, "duplicate": 1},
                       "gpt_oss_120b_thinking_trajectory": {"wrong": 1, "near_duplicate": 1}}
    assert (tmp_path / "fixture" / "report.md").read_text().startswith("# forklight prepare")
    records, _ = load_records(str(output))
    assert sorted(len(r.traces) for r in records) == [3, 3, 3, 3, 4]
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--data.init_args.train={output}",
          "--data.init_args.max_length=512", "--trainer.limit_val_batches=0"])
    assert list(tmp_path.rglob("last.ckpt")) or list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_prepare_sample_adds_teacher_traces_through_the_cli_and_resumes(tmp_path, capsys):
    """``forklight prepare --sample.teachers=[...]``: each teacher's complete samples join the trace sets, named by
    the teacher; a second run re-uses the store (no question sampled again) and writes the same parquet."""
    from tests.test_teachers import tiny_teacher

    teacher = tiny_teacher(tmp_path / "teachers" / "alpha", 0.3, seed=1)
    corpus = write_jsonl(tmp_path / "questions.jsonl",
                         [{"id": f"q{k}", "prompt": f"{k}+{k}=", "answer": str(2 * k), "traces": [f"so {2 * k}"]}
                          for k in range(3)])
    output = tmp_path / "out" / "train.parquet"
    args = ["prepare", f"--input={corpus}", f"--output={output}", "--verifier=null", "--min_traces=2",
            "--progress=false", "--overwrite=true", f"--sample.teachers=[{teacher}]", "--sample.num_samples=4",
            "--sample.engine=hf", "--sample.temperature=1.0", "--sample.top_p=1.0", "--sample.max_new_tokens=4"]
    main(args)
    first = pq.read_table(output).to_pylist()
    sources = Counter(trace["source"] for row in first for trace in row["traces"])
    assert set(sources) == {None, "alpha"} and sources[None] == 3 and 0 < sources["alpha"] <= 12
    assert (tmp_path / "out" / "train.parquet.samples" / "alpha.jsonl").exists()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["sources"]["alpha"]["read"] == 12  # K = 4 samples x 3 questions, truncated ones dropped as incomplete
    dropped = report["sources"]["alpha"]["dropped"]  # truncated (incomplete) and empty samples, counted
    assert set(dropped) <= {"incomplete", "empty"} and sum(dropped.values()) == 12 - sources["alpha"]
    main(args)
    again = json.loads((tmp_path / "out" / "report.json").read_text())["sampling"]["teachers"][0]
    assert (again["reused"], again["generated"]) == (3, 0)  # every question re-used from the store
    assert pq.read_table(output).to_pylist() == first
