"""The paper's evaluation protocol: benchmark loaders on fixtures in each benchmark's own layout, the choice
verifier, ragged samples per tag (n not divisible by N, tags without samples), the metric rules by hand,
forklight test writing results.json / results.md / samples.jsonl and resuming from them, and the inference API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from forklight.data.benchmarks import BENCHMARKS, load_benchmark, shuffled_options
from forklight.errors import ConfigError
from forklight.evaluation import QuestionEvaluation, evaluation_metrics, sample_tags
from forklight.metrics import deinterleave_tags, interleave_tags
from forklight.rewards import extract_choice, resolve_verifier
from tests.conftest import CONFIGS, tiny_export

FIXTURES = Path(__file__).parent / "fixtures" / "benchmarks"
SOURCES = {  # benchmark -> (local dir in the hub layout, one of its files)
    "aime24": ("aime_2024", "aime_2024/data/train-00000-of-00001.parquet"),
    "aime25": ("aime_2025", "aime_2025/data/train-00000-of-00001.parquet"),
    "math500": ("math500", "math500/test.jsonl"),
    "gpqa_diamond": ("gpqa", None),  # a csv and a README declaring the gpqa_diamond config, as on the hub
    "livecodebench": ("livecodebench", "livecodebench/test.jsonl"),
}


# ---- loaders -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_each_benchmark_reads_its_own_layout_from_a_file_and_a_local_dir(name):
    directory, file = SOURCES[name]
    by_dir, _ = load_benchmark(name, str(FIXTURES / directory), seed=0)  # through datasets.load_dataset
    assert by_dir and all(record.prompt and not record.traces for record in by_dir)
    if file is not None:
        by_file, _ = load_benchmark(name, str(FIXTURES / file), seed=0)
        assert [(r.id, r.prompt, r.answer) for r in by_file] == [(r.id, r.prompt, r.answer) for r in by_dir]
    first = by_dir[0]
    if name in ("aime24", "aime25", "math500"):
        assert first.prompt.endswith("put your final answer within \\boxed{}.") and first.answer
    if name == "math500":
        assert first.id == "test/prealgebra/1.json" and first.answer == "\\frac{3}{4}" and first.columns["subject"]
    if name == "livecodebench":
        assert first.answer is None and "public_test_cases" in first.columns
        assert "```python" in by_dir[1].prompt and "class Solution" in by_dir[1].prompt  # the starter code
        assert by_dir[1].columns["metadata"] == {"func_name": "double"}


def test_gpqa_options_are_shuffled_per_question_and_the_answer_is_the_correct_letter():
    records, _ = load_benchmark("gpqa_diamond", str(FIXTURES / "gpqa"), seed=0)
    again, _ = load_benchmark("gpqa_diamond", str(FIXTURES / "gpqa"), seed=0)
    other_seed, _ = load_benchmark("gpqa_diamond", str(FIXTURES / "gpqa"), seed=1)
    assert [r.prompt for r in records] == [r.prompt for r in again]  # the same order in every run and process
    assert [r.prompt for r in records] != [r.prompt for r in other_seed]
    correct = {"recA1": "Nitrogen", "recB2": "1/2", "recC3": "Mitochondrion"}
    for record in records:
        letter = record.answer
        assert f"\n{letter}) {correct[record.id]}" in record.prompt  # the gold letter names the correct option
        assert record.columns["choices"]["ABCD".index(letter)] == correct[record.id]
        assert "where LETTER is one of A, B, C, D" in record.prompt
    # the order depends on (seed, question id) only, not on the row's position
    assert shuffled_options("x", ["a", "b", "c"], 0, "q1") == shuffled_options("x", ["a", "b", "c"], 0, "q1")
    letters = {shuffled_options("x", ["a", "b", "c"], 0, f"q{i}")[1] for i in range(40)}
    assert letters == set("ABCD")


def test_a_row_in_another_layout_is_refused_naming_the_field():
    from forklight.data.records import RecordError

    with pytest.raises(RecordError, match=r"the gpqa_diamond row has no 'Question'"):
        load_benchmark("gpqa_diamond", str(FIXTURES / "math500" / "test.jsonl"), seed=0)


@pytest.mark.parametrize("text, letter", [
    ("so the answer is \\boxed{C}", "C"), ("\\boxed{(B)}", "B"), ("I think... Answer: D", "D"),
    ("The answer is (A).", "A"), ("**B**", "B"), ("reasoning\nC\n", "C"),
    ("<think>maybe A</think>The answer is B", "B"), ("Answer: A, no wait. Answer: C", "C"), ("no letter here", None),
])
def test_choice_letters_are_extracted(text, letter):
    assert extract_choice(text) == letter


@pytest.mark.parametrize("text, letter", [
    # \boxed{C}
    ("\\boxed{C}", "C"), ("so $\\boxed{\\text{(E)}}$", "E"), ("\\boxed{\\textbf{J}}", "J"),
    ("\\boxed{G) Nitrogen}", "G"), ("\\boxed{CH_4}", None),
    # "The answer is (C)"
    ("The answer is (C)", "C"), ("the answer is (H) because", "H"), ("The correct answer is option F.", "F"),
    ("The final answer is $I$.", "I"), ("The answer is I think unclear", None),
    # "**C**"
    ("**C**", "C"), ("My pick: **(D)**", "D"), ("**B) 1/2**", "B"), ("**Because** it is", None),
    # "Answer: C"
    ("Answer: C", "C"), ("ANSWER: J", "J"), ("Answer: **A**", "A"), ("Answer：B", "B"), ("**Answer: E**", "E"),
    ("Answer: C) Mitochondrion", "C"),
    # A-J, the last of the most explicit kind, the answer after </think>
    ("Answer: A\nwait... \\boxed{F}", "F"), ("<think>Answer: B</think>\n\nAnswer: D", "D"),
])
def test_choice_letters_are_extracted_from_each_answer_style_a_to_j(text, letter):
    assert extract_choice(text) == letter


def test_choice_letters_outside_the_options_are_ignored():
    verifier, _ = resolve_verifier({"class_path": "choice", "init_args": {"letters": "ABCD"}})
    assert verifier(["Answer: F", "Answer: F, no: Answer: B", "\\boxed{(c)}"], ["B", "B", "C"]) == [0.0, 1.0, 0.0]


def test_the_choice_verifier_scores_letters_and_skips_gold_that_is_not_one():
    verifier, extract = resolve_verifier("choice")
    assert verifier(["Answer: B", "\\boxed{C}", "nothing"], ["B", "B", "A"]) == [1.0, 0.0, 0.0]
    assert verifier(["Answer: B"], ["Nitrogen"]) == [None]
    assert extract("**D**") == "D"


# ---- protocol and metrics ----------------------------------------------------------------------------------------------
def test_samples_split_over_tags():
    assert sample_tags(6, 32, "even", 0) == [0] * 6 + [1] * 6 + [2] * 5 + [3] * 5 + [4] * 5 + [5] * 5
    assert sample_tags(6, 66, "even", 0).count(5) == 11
    assert sample_tags(3, 4, "default", 2) == [2, 2, 2, 2]
    drawn = sample_tags(3, 1000, "policy", 0, [0.7, 0.3, 0.0], np.random.default_rng(0))
    assert drawn == sorted(drawn) and drawn.count(2) == 0 and 600 < drawn.count(0) < 800
    assert interleave_tags([[1, 2], [3, 4], [5]]) == [1, 3, 5, 2, 4]
    assert deinterleave_tags([1, 3, 5, 2, 4], [2, 2, 1]) == [[1, 2], [3, 4], [5]]


def question(qid, answer, answers, scores):
    lengths = [[10 * (t + 1)] * len(row) for t, row in enumerate(answers)]
    return QuestionEvaluation(id=qid, answer=answer, scores=scores, answers=answers, lengths=lengths,
                              texts=[[f"so {a}" for a in row] for row in answers],
                              truncated=[[t == 2] * len(row) for t, row in enumerate(answers)])


def test_metrics_by_hand_with_5_samples_over_3_tags_ties_and_an_answerless_sample():
    evaluations = [  # 5 samples over 3 tags: 2, 2, 1
        question("a", "5", [["5", "7"], ["7", "5"], ["5"]], [[1.0, 0.0], [0.0, 1.0], [1.0]]),
        question("b", "9", [["1", "9"], ["9", "1"], [None]], [[0.0, 1.0], [1.0, 0.0], [0.0]]),
    ]
    metrics = evaluation_metrics(evaluations, num_tags=3, k=[2, 4, 5], same_answer=None,
                                 policy_tags={"coverage": 0, "fixed": 2}, fork_policy="coverage")
    assert metrics["tag1/pass@1"] == metrics["tag2/pass@1"] == metrics["tag3/pass@1"] == 0.5
    assert metrics["tag1/samples"] == 4 and metrics["tag3/samples"] == 2  # what was generated, nothing more
    assert metrics["pass@1/samples"] == pytest.approx((3 / 5 + 2 / 5) / 2)
    assert metrics["pass@2"] == pytest.approx((0.9 + 0.7) / 2)  # 1 - C(2,2)/C(5,2) and 1 - C(3,2)/C(5,2)
    assert metrics["pass@5"] == metrics["pass@k"] == 1.0
    # native cons@3: one complete round (tag 3 has one sample); a: 5,7,5 -> 5 (right); b: 1,9,- tie -> 1 (wrong)
    assert metrics["cons@N"] == 0.5
    # interleaved a: 5,7,5,7,5; b: 1,9,-,9,1. First 2: ties -> the earlier first member (a: 5 right, b: 1 wrong);
    # first 4: a tie -> 5, b: 9 wins 2 to 1 (right); all 5: b ties 2-2 again -> 1 (wrong)
    assert metrics["cons@2"] == 0.5 and metrics["cons@4"] == 1.0 and metrics["cons@5"] == 0.5
    assert metrics["tag1/maj@2"] == 0.5 and "tag3/maj@1" not in metrics  # a: 5,7 tie -> 5; b: 1,9 tie -> 1
    assert metrics["tag1/len"] == 10 and metrics["tag3/len_median"] == 30 and metrics["tag3/truncated"] == 1.0
    assert metrics["truncated"] == pytest.approx(2 / 10)
    assert metrics["pass@1"] == metrics["pass@1/coverage"] == 0.5


def test_tags_without_samples_are_absent_not_zero():
    evaluations = [question("a", "5", [["5", "5", "7"], [], []], [[1.0, 1.0, 0.0], [], []]),
                   question("b", "9", [["9", "1", "1"], [], []], [[1.0, 0.0, 0.0], [], []])]
    metrics = evaluation_metrics(evaluations, num_tags=3, k=[2, 3], same_answer=None,
                                 policy_tags={"coverage": 0, "fixed": 1}, fork_policy="fixed")
    assert metrics["tag1/pass@1"] == pytest.approx(0.5) and "tag2/pass@1" not in metrics and "tag2/len" not in metrics
    assert "cons@N" not in metrics  # no complete round of one sample per tag
    assert metrics["cons@3"] == 0.5 and metrics["tag1/maj@3"] == 0.5  # a: 5 wins; b: 1 wins (wrong)
    assert "pass@1/fixed" not in metrics and metrics["pass@1"] == metrics["pass@1/samples"] == pytest.approx(0.5)
    assert metrics["pass@1/uniform"] == metrics["pass@1/best_tag"] == pytest.approx(0.5)  # over tags with samples


def test_pass_at_k_counts_only_questions_with_k_scored_samples():
    evaluations = [question("a", "5", [["5"], ["5"]], [[1.0], [1.0]]),
                   question("b", "5", [["5"], ["7"]], [[None], [0.0]])]  # one unscorable sample
    metrics = evaluation_metrics(evaluations, num_tags=2, k=[1, 2], same_answer=None,
                                 policy_tags={"coverage": 0}, fork_policy="coverage")
    assert metrics["pass@1"] == 1.0  # tag 1: question b's sample is not scored, so only a counts
    assert metrics["pass@2"] == 1.0  # only question a has 2 scored samples
    assert metrics["tag2/pass@1"] == 0.5


# ---- forklight test ------------------------------------------------------------------------------------------------------
def eval_args(tmp_path, export, output, *extra):
    return ["test", "-c", str(CONFIGS / "eval" / "math500.yaml"), f"--model.init_args.init_from={export}",
            f"--data.init_args.test={FIXTURES / 'math500'}", "--model.init_args.engine=hf",
            "--model.init_args.max_new_tokens=6", "--model.init_args.samples_per_question=5",
            "--model.init_args.pass_k=[1,2,5]", "--trainer.accelerator=cpu", "--trainer.precision=32-true",
            "--trainer.enable_progress_bar=false", f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}",
            f"--model.init_args.eval_output={output}", *extra]


def test_forklight_test_on_a_benchmark_writes_results_and_resumes(tmp_path, monkeypatch):
    from forklight.cli import build_cli
    from forklight.rollout import HFEngine

    export, output = tiny_export(tmp_path), tmp_path / "out"
    generated = []
    real = HFEngine.generate

    def counting(self, prefixes, settings, *args, **kwargs):
        generated.append(len(prefixes))
        return real(self, prefixes, settings, *args, **kwargs)

    monkeypatch.setattr(HFEngine, "generate", counting)
    build_cli(eval_args(tmp_path, export, output))
    assert sum(generated) == 3 * 5  # 3 questions x 5 samples
    results = json.loads((output / "results.json").read_text())
    assert results["benchmark"] == "math500" and results["questions"] == 3
    assert results["protocol"]["samples_per_question"] == 5 and results["protocol"]["tag_sampling"] == "even"
    assert results["model"]["weights_sha256"] and results["versions"]["torch"] and "ties go" in results["rules"]["votes"]
    assert {"pass@1", "pass@2", "pass@5", "cons@N", "cons@5", "tag1/len_median"} <= set(results["metrics"])
    table = (output / "results.md").read_text()
    assert table.startswith("| Benchmark | Pass@1 | Cons@3 | Cons@2 | Cons@5 |") and "| math500 |" in table
    rows = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 15 and {r["tag_index"] for r in rows} == {0, 1, 2}
    assert {"id", "tag", "completion", "answer", "score", "length", "truncated"} <= set(rows[0])

    # a killed evaluation: the last question's samples lost (the second half of a write cut off too)
    kept = [r for r in rows if r["id"] != rows[-1]["id"]]
    (output / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"id": "cut', encoding="utf-8")
    generated.clear()
    build_cli(eval_args(tmp_path, export, output))
    assert sum(generated) == 5  # only the unfinished question
    resumed = json.loads((output / "results.json").read_text())
    assert resumed["questions"] == 3 and len((output / "samples.jsonl").read_text().splitlines()) == 15
    for key in ("tag1/samples", "tag2/samples", "tag3/samples"):
        assert resumed["metrics"][key] == results["metrics"][key]

    with pytest.raises(ConfigError, match=r"holds samples of another evaluation \(protocol.temperature: 0.7 -> 0.3\)"):
        build_cli(eval_args(tmp_path, export, output, "--model.init_args.eval_temperature=0.3"))


LCB_PROGRAM = ("Both problems at once:\n```python\nimport sys\n\nclass Solution:\n    def double(self, x: int) -> int:\n"
               "        return 2 * x\n\nwords = sys.stdin.read().split()\nif words:\n"
               "    print(int(words[0]) + int(words[1]))\n```")


def test_livecodebench_is_scored_by_the_code_verifier_in_its_sandbox(tmp_path, monkeypatch):
    from forklight.cli import build_cli
    from forklight.rollout import Completion, HFEngine

    def writes_the_program(self, prefixes, settings, *args, **kwargs):  # a model that solves both fixture rows
        return [Completion(token_ids=[7], text=LCB_PROGRAM, length=1, truncated=False, stop_token=5) for _ in prefixes]

    monkeypatch.setattr(HFEngine, "generate", writes_the_program)
    output = tmp_path / "out"
    build_cli(["test", "-c", str(CONFIGS / "eval" / "livecodebench.yaml"),
               f"--model.init_args.init_from={tiny_export(tmp_path)}", "--model.init_args.engine=hf",
               f"--data.init_args.test={FIXTURES / 'livecodebench'}", "--model.init_args.samples_per_question=3",
               "--model.init_args.pass_k=[1]", "--model.init_args.max_new_tokens=4", "--trainer.accelerator=cpu",
               "--trainer.precision=32-true", "--trainer.enable_progress_bar=false",
               f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", f"--model.init_args.eval_output={output}"])
    results = json.loads((output / "results.json").read_text())
    assert results["questions"] == 2 and results["metrics"]["pass@1"] == 1.0  # stdin and functional rows, public + private
    samples = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and all(sample["score"] == 1.0 for sample in samples)


# ---- inference ------------------------------------------------------------------------------------------------------------
def test_the_inference_api_generates_after_chosen_tags_and_votes(tmp_path):
    from forklight.inference import ForkingModel

    model = ForkingModel(str(tiny_export(tmp_path)), verifier="exact_integer", max_new_tokens=5, device="cpu")
    assert model.tags == ["<think1>", "<think2>", "<think3>"]
    by_tag = model.generate("12+30", tags="all", n=2)
    assert list(by_tag) == model.tags and all(len(c) == 2 for c in by_tag.values())
    assert all(c.length <= 5 and not set(c.token_ids) & set(model.module.fork_token_ids)
               for completions in by_tag.values() for c in completions)
    assert list(model.generate("12+30", tags=[2], n=3)) == ["<think3>"]
    assert list(model.generate("12+30", tags="default")) == [model.tags[model.module.default_tag]]
    policy = model.tag_policy("12+30")
    assert len(policy) == 3 and abs(sum(policy) - 1) < 1e-5
    assert sum(map(len, model.generate("12+30", tags="policy", n=4).values())) == 4
    assert model.generate("12+30", n=1, seed=3)["<think1>"][0].text == model.generate("12+30", n=1, seed=3)["<think1>"][0].text
    solution = model.solve("12+30")
    assert sum(solution.votes.values()) == sum(a is not None for row in solution.answers.values() for a in row)
    assert solution.answer is None or solution.answer in solution.votes
    with pytest.raises(ValueError, match=r"tags must be 'all', 'default', 'policy' or a list of tag indices in \[0, 2\]"):
        model.generate("12+30", tags=[5])


def test_protocol_options_are_checked_naming_the_key(tiny_ssft, tmp_path):
    with pytest.raises(ValueError, match=r"model.eval_tag_sampling must be one of \('even', 'default', 'policy'\)"):
        tiny_ssft(eval_tag_sampling="uneven")
    with pytest.raises(ValueError, match=r"model.pass_k must be in \[1, samples per question = 12\]"):
        tiny_ssft(samples_per_question=12, pass_k=[1, 32])
    with pytest.raises(ValueError, match=r"model.samples_per_question must be >= 1 or null, got 0"):
        tiny_ssft(samples_per_question=0)
    with pytest.raises(ValueError, match=r"model.num_fork_tokens is null, which means 'as many as model.init_from "
                                         r"has', but init_from is unset"):
        tiny_ssft(num_fork_tokens=None)
    assert tiny_ssft(samples_per_question=12, pass_k=[1, 6, 12]).evaluator.pass_ks() == [1, 6, 12]


def test_a_directory_with_samples_is_not_overwritten_without_resume(tmp_path):
    from forklight.results import SampleStore

    identity = {"protocol": {"temperature": 0.7}, "model": {"weights_sha256": "abc"}}
    store = SampleStore(tmp_path, identity, samples=2)
    store.append([{"id": "q", "tag_index": 0, "sample": 0}, {"id": "q", "tag_index": 1, "sample": 0}])
    assert set(SampleStore(tmp_path, identity, samples=2).finished) == {"q"}
    with pytest.raises(ConfigError, match=r"model.eval_resume is false but .* already holds samples \(samples.jsonl\)"):
        SampleStore(tmp_path, identity, samples=2, resume=False)


def test_a_resumed_sample_store_cuts_the_line_a_kill_left_unfinished(tmp_path):
    """A kill mid-write leaves a last line without its newline; a resume cuts it, so the next question's rows start
    lines of their own (glued onto the cut line, its first row would be lost and the question generated again)."""
    from forklight.results import SampleStore

    identity = {"protocol": {"temperature": 0.7}, "model": {"weights_sha256": "abc"}}
    rows = {qid: [{"id": qid, "tag_index": tag, "sample": 0} for tag in range(2)] for qid in ("q", "r")}
    store = SampleStore(tmp_path, identity, samples=2)
    store.append(rows["q"])
    with open(store.path, "a") as handle:
        handle.write('{"id": "r", "tag_ind')  # the kill
    resumed = SampleStore(tmp_path, identity, samples=2)
    assert set(resumed.finished) == {"q"}
    resumed.append(rows["r"])
    assert [json.loads(line)["id"] for line in store.path.read_text().splitlines()] == ["q", "q", "r", "r"]
    assert set(SampleStore(tmp_path, identity, samples=2).finished) == {"q", "r"}


def test_a_run_config_with_its_own_tokenizer_takes_the_exports_when_starting_from_one(tmp_path):
    from forklight.cli import build_cli
    from tests.conftest import tiny_overrides

    export = tiny_export(tmp_path)
    cli = build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--model.init_args.init_from={export}",
                     "--model.init_args.num_fork_tokens=null"], run=False)
    assert cli.datamodule.hparams.tokenizer == cli.model.hparams.tokenizer == str(export)  # the config says "toy"
    assert cli.datamodule.hparams.num_fork_tokens == cli.model.hparams.num_fork_tokens == 3
    assert cli.datamodule.hparams_initial["num_fork_tokens"] == 3  # what Lightning merges with the model's


@pytest.mark.slow
def test_an_evaluation_under_ddp_writes_one_merged_sample_file_and_the_same_metrics_shape(tmp_path):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    export, output = tiny_export(tmp_path), tmp_path / "out"
    command = [sys.executable, "-m", "forklight", *eval_args(tmp_path, export, output),
               "-c", str(CONFIGS / "strategies" / "ddp.yaml"), "--data.init_args.eval_batch_size=1"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in (output / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["id"] for r in rows}) == sorted(r.id for r in load_benchmark("math500", str(FIXTURES / "math500"), 0)[0])
    assert len(rows) == 3 * 5 and not list(output.glob("samples.rank*.jsonl"))  # the ranks' files merged
    assert json.loads((output / "results.json").read_text())["questions"] == 3
