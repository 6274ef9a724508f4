"""Sampling trace sets from teachers (forklight/teachers/): K samples per question per teacher, named by the teacher;
truncated ones left out and counted; the same samples for the same seed, whatever the batch or the interruption; a
run SIGKILLed mid-write resumes without sampling its finished questions again and ends as an uninterrupted run; a
store of another protocol is refused; located config errors. The teachers are tiny transformers models whose next
token never depends on the context (a constant hidden state), so each step ends a completion with a known
probability. The SmolLM2 GGUF teacher runs on hf (slow) and on vLLM (marked ``vllm``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from forklight import teachers
from forklight.data.records import QuestionRecord, Trace
from forklight.errors import ConfigError, UserError
from forklight.teachers import TeacherSampling, sample_traces
from tests.conftest import REPO, TINY_MODEL_CONFIG


def tiny_teacher(directory: Path, stop_probability: float, seed: int = 0) -> str:
    """A tiny llama on the toy tokenizer, saved in ``directory``, whose every step samples the end-of-turn token with
    ``stop_probability`` (at temperature 1) and otherwise any other non-special token, uniformly: every layer adds
    nothing to the residual (zero output projections) and all embeddings are equal, so the final hidden state is
    the same vector h at every position, and the output rows are set so that ``W h`` is the wanted logits."""
    from forklight.data.toy import build_toy_tokenizer
    from forklight.models import build_causal_lm

    tokenizer = build_toy_tokenizer()
    torch.manual_seed(seed)
    model = build_causal_lm(None, dict(TINY_MODEL_CONFIG), tokenizer, None, False)
    vocab = model.get_input_embeddings().weight.shape[0]
    with torch.no_grad():
        model.get_input_embeddings().weight[:] = torch.randn(TINY_MODEL_CONFIG["hidden_size"])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hidden = model.model.norm(model.get_input_embeddings().weight[:1])[0]  # [H] the constant final hidden state
        special = [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id]
        ordinary = vocab - len(special)
        logits = torch.zeros(vocab)  # [V]
        logits[[tokenizer.pad_token_id, tokenizer.unk_token_id]] = -30.0
        logits[tokenizer.eos_token_id] = math.log(stop_probability * ordinary / (1 - stop_probability))
        model.get_output_embeddings().weight[:] = logits[:, None] * hidden[None, :] / hidden.dot(hidden)  # [V, H]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory) -> dict[str, str]:
    """Two tiny teachers: ``alpha`` stops at each step with probability 0.3, ``beta`` with 0.5."""
    root = tmp_path_factory.mktemp("teachers")
    return {"alpha": tiny_teacher(root / "alpha", 0.3, seed=1), "beta": tiny_teacher(root / "beta", 0.5, seed=2)}


def records_of(count: int) -> list[QuestionRecord]:
    return [QuestionRecord(f"q{i}", f"{i}+{i}=", None, str(2 * i), [Trace(f"{i} and {i} make {2 * i}", "data")])
            for i in range(count)]


def sampling_of(teacher_entries: list, **options) -> TeacherSampling:
    """K = 4 samples of at most 4 tokens at temperature 1 on hf."""
    settings = {"num_samples": 4, "engine": "hf", "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 4, **options}
    return TeacherSampling(teachers=list(teacher_entries), **settings)


def store_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def added(records: list[QuestionRecord]) -> list[list[tuple[str, str | None]]]:
    """Per question, the traces sampling added (text, source)."""
    return [[(t.text, t.source) for t in record.traces if t.source != "data"] for record in records]


def test_k_samples_per_question_per_teacher_named_by_the_teacher_truncated_ones_left_out_and_counted(tmp_path,
                                                                                                   tiny_teachers):
    records = records_of(5)
    sampling = sampling_of([tiny_teachers["alpha"], {"name_or_path": tiny_teachers["beta"], "name": "B"}])
    out, report = sample_traces(records, sampling, str(tmp_path / "store"), progress=False)

    assert [r.traces for r in records] == [[Trace(f"{i} and {i} make {2 * i}", "data")] for i in range(5)]  # untouched
    assert [t.name for t in report.teachers] == ["alpha", "B"]  # the path's basename, or the given name
    expected_dropped: Counter = Counter()
    for teacher, name in zip(report.teachers, ["alpha", "B"]):
        rows = store_rows(tmp_path / "store" / f"{name}.jsonl")
        assert rows[0]["protocol"]["teacher"] == name and rows[0]["protocol"]["num_samples"] == 4
        assert [row["id"] for row in rows[1:]] == [r.id for r in records]
        assert all(len(row["samples"]) == 4 for row in rows[1:])  # K per question
        samples = [s for row in rows[1:] for s in row["samples"]]
        truncated = [s for s in samples if s["truncated"]]
        empty = [s for s in samples if not s["truncated"] and not s["text"].strip()]
        assert all(s["length"] == 4 for s in truncated) and all(s["length"] <= 4 for s in samples)
        assert truncated and len(truncated) + len(empty) < len(samples)  # some of each: the test is not idle
        assert (teacher.questions, teacher.generated, teacher.reused, teacher.samples_written) == (5, 5, 0, 20)
        assert (teacher.truncated, teacher.empty, teacher.traces) == (
            len(truncated), len(empty), len(samples) - len(truncated) - len(empty))
        expected_dropped["incomplete", name] += len(truncated)
        expected_dropped["empty", name] += len(empty)
        for record, row in zip(out, rows[1:]):  # this teacher's traces: its complete samples, in order
            kept = [s["text"] for s in row["samples"] if not s["truncated"] and s["text"].strip()]
            assert [t.text for t in record.traces if t.source == name] == kept
    assert report.dropped == +expected_dropped
    for original, record in zip(records, out):
        assert record.traces[0] == original.traces[0]  # the data's own traces first, then alpha's, then B's
        sources = [t.source for t in record.traces[1:]]
        assert sources == sorted(sources, key=["alpha", "B"].index)
        assert all(t.location.startswith(str(tmp_path / "store")) for t in record.traces[1:])
    assert "truncated (dropped as incomplete)" in report.summary()


def test_the_same_seed_gives_the_same_samples_whatever_the_other_questions(tmp_path, tiny_teachers):
    records, sampling = records_of(4), sampling_of([tiny_teachers["alpha"]])
    first, _ = sample_traces(records, sampling, str(tmp_path / "one"), progress=False)
    again, _ = sample_traces(records, sampling, str(tmp_path / "two"), progress=False)
    assert added(first) == added(again) and any(added(first))
    alone, _ = sample_traces(records[2:3], sampling, str(tmp_path / "three"), progress=False)
    assert added(alone) == added(first)[2:3]  # a question's samples depend on (seed, teacher, question) only
    other, _ = sample_traces(records, sampling_of([tiny_teachers["alpha"]], seed=1), str(tmp_path / "four"),
                             progress=False)
    assert added(other) != added(first)


class GenerateCounter:
    """Counts the prompts HFEngine samples (K rows of one question per call)."""

    def __init__(self, monkeypatch) -> None:
        from forklight.rollout import HFEngine

        self.calls = 0
        original = HFEngine.generate

        def generate(engine, prefixes, settings, progress=None):
            self.calls += 1
            return original(engine, prefixes, settings, progress)

        monkeypatch.setattr(HFEngine, "generate", generate)


# The child samples with two teachers and is SIGKILLed (by itself) in the middle of writing teacher B's second
# question: alpha's store is complete, B's holds one question and half a line.
_KILLED_MID_WRITE = """
import json, os, signal, sys
from forklight import teachers
from tests.test_teachers import records_of, sampling_of

spec = json.loads(sys.argv[1])
original = teachers.TeacherStore.append
appends = []

def append_or_die(store, questions):
    appends.append(store.path.name)
    if appends.count("B.jsonl") < 2:
        return original(store, questions)
    line = json.dumps({"id": questions[0].id, "question_sha256": questions[0].question_sha256, "samples": []})
    with open(store.path, "a") as handle:
        handle.write(line[: len(line) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    os.kill(os.getpid(), signal.SIGKILL)

teachers.TeacherStore.append = append_or_die
teachers.sample_traces(records_of(spec["questions"]), sampling_of(spec["teachers"]), spec["store"], progress=False)
"""


def test_a_run_killed_mid_write_resumes_without_sampling_finished_questions_again(tmp_path, tiny_teachers,
                                                                                  monkeypatch):
    entries = [tiny_teachers["alpha"], {"name_or_path": tiny_teachers["beta"], "name": "B"}]
    store = tmp_path / "store"
    spec = {"questions": 5, "teachers": entries, "store": str(store)}
    child = subprocess.run([sys.executable, "-c", _KILLED_MID_WRITE, json.dumps(spec)], cwd=REPO, capture_output=True,
                           text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
    assert len(store_rows(store / "alpha.jsonl")) == 6  # header + 5 questions
    cut = (store / "B.jsonl").read_text()
    assert not cut.endswith("\n") and len(cut.splitlines()) == 3  # header, q0, half of q1's line
    alpha_before = (store / "alpha.jsonl").read_bytes()
    b_before = cut[: cut.rindex("\n") + 1]

    counter = GenerateCounter(monkeypatch)
    resumed, report = sample_traces(records_of(5), sampling_of(entries), str(store), progress=False)
    assert counter.calls == 4  # B's q1..q4; nothing of alpha, nor B's q0
    assert [(t.reused, t.generated, t.samples_written) for t in report.teachers] == [(5, 0, 0), (1, 4, 16)]
    assert (store / "alpha.jsonl").read_bytes() == alpha_before
    repaired = (store / "B.jsonl").read_text()
    assert repaired.startswith(b_before) and [row["id"] for row in store_rows(store / "B.jsonl")[1:]] == [
        "q0", "q1", "q2", "q3", "q4"]  # the half line is gone, every line whole

    uninterrupted, whole = sample_traces(records_of(5), sampling_of(entries), str(tmp_path / "whole"), progress=False)
    assert resumed == uninterrupted  # questions, traces (text and source) and their order
    assert [(t.traces, t.truncated, t.empty) for t in report.teachers] == [
        (t.traces, t.truncated, t.empty) for t in whole.teachers]


def test_changed_questions_are_sampled_again_and_a_moved_teacher_is_the_same_teacher(tmp_path, tiny_teachers,
                                                                                       monkeypatch):
    store = str(tmp_path / "store")
    sample_traces(records_of(3), sampling_of([tiny_teachers["alpha"]]), store, progress=False)
    changed = records_of(3)
    changed[1].prompt = "1+100="
    counter = GenerateCounter(monkeypatch)
    second, report = sample_traces(changed, sampling_of([tiny_teachers["alpha"]]), store, progress=False)
    assert counter.calls == 1 and (report.teachers[0].reused, report.teachers[0].generated) == (2, 1)

    moved = tmp_path / "elsewhere" / "alpha"  # a copy of the same weights at another path: the same fingerprint
    shutil.copytree(tiny_teachers["alpha"], moved)

    def no_model(*args, **kwargs):
        raise AssertionError("a teacher with nothing left to sample must not be loaded")

    monkeypatch.setattr("forklight.teachers.sampling.HFSampler", no_model)  # where sample_teacher looks it up
    again, report = sample_traces(changed, sampling_of([str(moved)]), store, progress=False)
    assert (report.teachers[0].reused, report.teachers[0].generated) == (3, 0)
    assert again == second


def test_a_store_of_another_protocol_is_refused_saying_what_differs(tmp_path, tiny_teachers):
    store = tmp_path / "store"
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teachers["alpha"], teacher)
    sample_traces(records_of(2), sampling_of([str(teacher)]), str(store), progress=False)
    with pytest.raises(ConfigError, match=r"temperature: 1\.0 -> 0\.5.*delete .*teacher\.jsonl"):
        sample_traces(records_of(2), sampling_of([str(teacher)], temperature=0.5), str(store), progress=False)
    with pytest.raises(ConfigError, match=r"num_samples: 4 -> 2"):
        sample_traces(records_of(2), sampling_of([str(teacher)], num_samples=2), str(store), progress=False)
    for file in Path(tiny_teachers["beta"]).iterdir():  # other weights at the same path
        shutil.copy(file, teacher / file.name)
    with pytest.raises(ConfigError, match=r"fingerprint: '[0-9a-f]{64}' -> '[0-9a-f]{64}'"):
        sample_traces(records_of(2), sampling_of([str(teacher)]), str(store), progress=False)
    (store / "notes.jsonl").write_text('{"hello": 1}\n')
    with pytest.raises(UserError, match="not a forklight teacher sample store"):
        sample_traces(records_of(2), sampling_of([{"name_or_path": str(teacher), "name": "notes"}]), str(store),
                      progress=False)


def test_config_errors_name_their_key(tmp_path, tiny_teachers):
    alpha = tiny_teachers["alpha"]
    records, store = records_of(1), str(tmp_path / "store")
    cases = [
        (sampling_of([alpha, str(tmp_path / "missing")]),
         r"sample\.teachers\[1\]\.name_or_path: .*missing does not exist"),
        (sampling_of([str(tmp_path)]), r"sample\.teachers\[0\]\.name_or_path: .* has no config\.json"),
        (sampling_of([alpha], num_samples=0), r"sample\.num_samples must be >= 1, got 0"),
        (sampling_of([alpha], engine="tpu"), r"sample\.engine must be one of auto, hf, vllm"),
        (sampling_of([alpha], temperature=0.0), r"sample\.temperature=0 is greedy"),
        (sampling_of([alpha, {"name_or_path": tiny_teachers["beta"], "name": "alpha"}]),
         r"sample\.teachers\[1\] and sample\.teachers\[0\] have the same name 'alpha'"),
        (sampling_of([{"name_or_path": alpha, "dtype": "int4"}]), r"sample\.teachers\[0\]\.dtype must be one of"),
    ]
    for sampling, message in cases:
        with pytest.raises(ConfigError, match=message):
            sample_traces(records, sampling, store, progress=False)
    with pytest.raises(ConfigError, match=r"sample\.teachers\[0\] has unknown keys \['temperature'\]"):
        sampling_of([{"name_or_path": alpha, "temperature": 1.0}])
    with pytest.raises(ConfigError, match=r"sample\.vllm has unknown keys \['gpu'\]"):
        sampling_of([alpha], vllm={"gpu": 1})
    with pytest.raises(UserError, match="question id 'q0' appears twice"):
        sample_traces(records + records, sampling_of([alpha]), store, progress=False)
    assert not os.path.exists(store)  # every error came before anything was written


def test_a_tokenizer_without_chat_template_needs_prompt_template(tmp_path, tiny_teachers):
    plain = tmp_path / "plain"
    shutil.copytree(tiny_teachers["alpha"], plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    message = r"sample\.teachers\[0\] .*no chat template; set sample\.teachers\[0\]\.prompt_template"
    with pytest.raises(ConfigError, match=message):
        sample_traces(records_of(1), sampling_of([str(plain)]), str(tmp_path / "store"), progress=False)
    templated = {"name_or_path": str(plain), "prompt_template": "Q: {prompt}\nA: "}
    out, report = sample_traces(records_of(2), sampling_of([templated]), str(tmp_path / "store"), progress=False)
    assert report.teachers[0].generated == 2
    assert store_rows(tmp_path / "store" / "plain.jsonl")[0]["protocol"]["prompt_template"] == "Q: {prompt}\nA: "


def test_engine_vllm_without_vllm_says_what_to_install(tmp_path, tiny_teachers):
    if teachers.vllm_import_error() is None:
        pytest.skip("vLLM imports here")
    with pytest.raises(ConfigError, match=r"sample\.engine=vllm needs vLLM.*forklight\[vllm\]"):
        sample_traces(records_of(1), sampling_of([tiny_teachers["alpha"]], engine="vllm"), str(tmp_path / "s"),
                      progress=False)


def test_progress_lines_on_stderr(tmp_path, tiny_teachers, capsys):
    sample_traces(records_of(3), sampling_of([tiny_teachers["alpha"]], questions_per_chunk=2), str(tmp_path / "s"))
    err = capsys.readouterr().err
    assert "teacher alpha (hf): 0 of 3 questions" in err
    assert "sample alpha (hf): 2/3 questions" in err and "sample alpha (hf): 3/3 questions" in err
    sample_traces(records_of(3), sampling_of([tiny_teachers["alpha"]]), str(tmp_path / "t"), progress=False)
    assert capsys.readouterr().err == ""


QUESTIONS = ["What is 2+3? Reply with the number only.", "Name a primary colour in one word.",
             "What is the capital of France? One word.", "Is 7 prime? Answer yes or no."]


def chat_records() -> list[QuestionRecord]:
    return [QuestionRecord(f"c{i}", text, None, None, []) for i, text in enumerate(QUESTIONS)]


@pytest.mark.slow
def test_a_gguf_teacher_samples_on_hf(tmp_path, smollm2_gguf):
    sampling = TeacherSampling(teachers=[smollm2_gguf], num_samples=2, engine="hf", max_new_tokens=24)
    out, report = sample_traces(chat_records()[:2], sampling, str(tmp_path / "store"), progress=False)
    teacher = report.teachers[0]
    assert teacher.name == "SmolLM2-135M-Instruct.Q4_1" and teacher.engine == "hf"
    assert teacher.traces + teacher.truncated + teacher.empty == 4 and teacher.traces >= 1
    assert all(t.source == teacher.name and t.text.strip() for r in out for t in r.traces)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_samples_a_gguf_teacher_and_resumes(tmp_path, smollm2_gguf):
    """Two engine starts: the first two questions, then (one of them lost from the store) all four; the lost one
    comes back with the same samples although its batch changed."""
    from forklight.vllm_engine import cpu_environment

    cpu_environment(os.environ)
    store = tmp_path / "store"
    options = {"num_samples": 3, "engine": "vllm", "max_new_tokens": 32, "questions_per_chunk": 2,
               "vllm": {"kv_cache_memory_bytes": 2**27, "max_model_len": 512}}
    teacher = {"name_or_path": smollm2_gguf, "name": "smol", "dtype": "float32"}
    first, report = sample_traces(chat_records()[:2], TeacherSampling(teachers=[teacher], **options), str(store),
                                  progress=False)
    assert report.teachers[0].engine == "vllm" and report.teachers[0].generated == 2
    rows = store_rows(store / "smol.jsonl")
    assert [len(row["samples"]) for row in rows[1:]] == [3, 3]
    samples = [s for row in rows[1:] for s in row["samples"]]
    assert any(not s["truncated"] and s["text"].strip() for s in samples)
    assert len({s["text"] for s in rows[1]["samples"]}) > 1 or rows[1]["samples"][0]["length"] <= 2  # seeds differ
    assert not [p for p in store.iterdir() if p.name.startswith(".gguf-")]  # the dequantised copy is removed
    (store / "smol.jsonl").write_text("\n".join(json.dumps(row) for row in rows[:2]) + "\n")  # c1 lost

    resumed, report = sample_traces(chat_records(), TeacherSampling(teachers=[teacher], **options), str(store),
                                    progress=False)
    assert (report.teachers[0].reused, report.teachers[0].generated) == (1, 3)
    assert store_rows(store / "smol.jsonl")[2] == rows[2]  # c1 again, now batched with c2: the same samples
    assert added(resumed)[:2] == added(first)
    teacher_report = report.teachers[0]
    assert teacher_report.traces + teacher_report.truncated + teacher_report.empty == 12
