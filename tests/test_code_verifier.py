"""The ``code`` verifier: code extraction, every test layout (LiveCodeBench stdin/functional and compressed private
cases, APPS/TACO stdin and call-based, plain tests) against correct, wrong, partial, syntax-error, runtime-error and
timeout programs, the comparison rules, adversarial programs scored 0 beside a correct one scored 1, a reward
through an RL module's own reward path, and a GRPO run through the CLI with ``verifier=code``."""

from __future__ import annotations

import base64
import json
import os
import pickle
import zlib
from pathlib import Path

import pytest
import torch

from forklight.rewards import CodeVerifier, extract_code, resolve_verifier, run_verifier, score_batch
from forklight.rewards.code_tests import decode_livecodebench_cases, pickled_string, read_tests, stdout_matches, value_matches
from tests.conftest import CONFIGS, fake_rollouts, tiny_export, tiny_overrides

FIXTURE = Path(__file__).parent / "fixtures" / "code"
ADD_CASES = [("1 2", 3), ("2 3", 5), ("10 20", 30)]  # a + b; the program "partial" gets only the first two


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\n"


STDIN_PROGRAMS = {  # program -> its share of the three tests
    "correct": ("a, b = map(int, input().split())\nprint(a + b)", 1.0),
    "wrong": ("print(0)", 0.0),
    "partial": ("a, b = map(int, input().split())\nprint(a + b if a < 10 else 0)", 2 / 3),
    "syntax error": ("print(", 0.0),
    "runtime error": ("a, b = map(int, input().split())\nprint(a // 0)", 0.0),
    "timeout": ("while True:\n    pass", 0.0),
}
CALL_PROGRAMS = {
    "correct": ("def add(a, b):\n    return a + b", 1.0),
    "wrong": ("def add(a, b):\n    return 0", 0.0),
    "partial": ("def add(a, b):\n    return a + b if a < 10 else 0", 2 / 3),
    "syntax error": ("def add(a, b):\n    return a +", 0.0),
    "runtime error": ("def add(a, b):\n    return a // 0", 0.0),
    "timeout": ("def add(a, b):\n    while True:\n        pass", 0.0),
}


def as_solution_class(code: str) -> str:
    """LeetCode style, as LiveCodeBench's functional tests call it: a method of ``class Solution``."""
    body = code.replace("def add(a, b):", "def add(self, a, b):")
    return "class Solution:\n" + "\n".join("    " + line for line in body.splitlines())


def compressed(cases: list[dict]) -> str:
    """LiveCodeBench's hub encoding of private cases: base64(zlib(pickle(JSON string)))."""
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def lcb_stdin_row() -> dict:
    cases = [{"input": f"{x}\n", "output": f"{y}\n", "testtype": "stdin"} for x, y in ADD_CASES]
    return {"public_test_cases": json.dumps(cases[:1]), "private_test_cases": compressed(cases[1:]), "metadata": "{}"}


def lcb_functional_row() -> dict:
    cases = [{"input": "\n".join(x.split()), "output": str(y), "testtype": "functional"} for x, y in ADD_CASES]
    return {"public_test_cases": cases[:2], "private_test_cases": json.dumps(cases[2:]), "metadata": {"func_name": "add"}}


LAYOUTS = {  # layout -> (columns of one record, stdin or call programs, how a program is written for it)
    "livecodebench stdin": (lcb_stdin_row(), STDIN_PROGRAMS, str),
    "livecodebench functional": (lcb_functional_row(), CALL_PROGRAMS, as_solution_class),
    "apps stdin": ({"input_output": json.dumps({"inputs": [x + "\n" for x, _ in ADD_CASES],
                                                "outputs": [f"{y}\n" for _, y in ADD_CASES]})}, STDIN_PROGRAMS, str),
    "apps call": ({"input_output": {"inputs": [list(map(int, x.split())) for x, _ in ADD_CASES],
                                    "outputs": [[y] for _, y in ADD_CASES], "fn_name": "add"}}, CALL_PROGRAMS, str),
    "plain": ({"tests": [{"input": x, "output": str(y)} for x, y in ADD_CASES]}, STDIN_PROGRAMS, str),
}


@pytest.fixture(scope="module")
def verifier():
    return CodeVerifier(test_timeout_s=1.0, program_timeout_s=20.0, memory_mb=512, workers=2)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_scores_correct_wrong_partial_broken_and_slow_programs(verifier, layout):
    row, programs, write = LAYOUTS[layout]
    names = sorted(programs)
    completions = [fenced(write(programs[name][0])) for name in names]
    columns = {key: [value] * len(names) for key, value in row.items()}
    scores = verifier(completions, [None] * len(names), **columns)
    assert dict(zip(names, scores)) == pytest.approx({name: programs[name][1] for name in names})


def test_all_or_nothing_scoring_and_a_test_cut(verifier):
    strict = CodeVerifier(scoring="all", test_timeout_s=1.0, program_timeout_s=20.0, workers=2)
    row = LAYOUTS["plain"][0]
    partial, correct = fenced(STDIN_PROGRAMS["partial"][0]), fenced(STDIN_PROGRAMS["correct"][0])
    assert strict([partial, correct], [None, None], tests=[row["tests"]] * 2) == [0.0, 1.0]
    first_two = CodeVerifier(max_tests=2, test_timeout_s=1.0, workers=1)
    assert first_two([partial], [None], tests=[row["tests"]]) == [1.0]  # the test it fails is cut


def test_public_or_private_livecodebench_cases(verifier):
    public = CodeVerifier(test_cases="public", test_timeout_s=1.0, workers=1)
    partial = fenced(STDIN_PROGRAMS["partial"][0])
    row = lcb_stdin_row()
    assert public([partial], [None], **{k: [v] for k, v in row.items()}) == [1.0]  # public: (1, 2) only
    assert verifier([partial], [None], **{k: [v] for k, v in row.items()}) == [pytest.approx(2 / 3)]


def test_a_hidden_data_directory_cannot_be_read_for_the_expected_outputs():
    data = Path("/var/tmp") / f"forklight-test-data-{os.getpid()}"  # outside /tmp, which is the sandbox's own
    data.mkdir(mode=0o755)
    try:
        (data / "tests.jsonl").write_text('{"output": "3"}')
        os.chmod(data / "tests.jsonl", 0o644)
        cheat = fenced(f"import json\nprint(json.loads(open({str(data / 'tests.jsonl')!r}).read())['output'])")
        tests = [[{"input": "", "output": "3"}]]
        assert CodeVerifier(workers=1)([cheat], [None], tests=tests) == [1.0]  # readable by anyone: it cheats
        assert CodeVerifier(workers=1, hidden_paths=[str(data)])([cheat], [None], tests=tests) == [0.0]
    finally:
        for path in data.iterdir():
            path.unlink()
        data.rmdir()


def test_no_code_scores_zero_and_no_tests_skips(verifier):
    before = dict(verifier.counts)
    assert verifier(["I would print the sum."], [None], tests=[[{"input": "1 2", "output": "3"}]]) == [0.0]
    assert verifier([fenced("print(3)")], [None], tests=[None]) == [None]
    assert verifier([fenced("print(3)")], [None], tests=[[]]) == [None]
    assert verifier.counts["no_code"] == before.get("no_code", 0) + 1
    assert verifier.counts["no_tests"] == before.get("no_tests", 0) + 2


def test_malformed_or_malicious_test_columns_are_skipped_never_unpickled(verifier, tmp_path):
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = base64.b64encode(zlib.compress(pickle.dumps(Exploit()))).decode()
    with pytest.raises(ValueError, match="never unpickles"):
        decode_livecodebench_cases(evil)
    scores = verifier([fenced("print(3)")] * 3, [None] * 3, public_test_cases=[None, "not json, not base64", None],
                      private_test_cases=[evil, None, json.dumps([{"input": "", "output": "3", "testtype": "alien"}])])
    assert scores == [None, None, None] and not marker.exists()
    assert pickled_string(pickle.dumps("[1, 2]", protocol=0)) == "[1, 2]"  # every protocol's string opcodes
    assert pickled_string(pickle.dumps("x" * 70000, protocol=5)) == "x" * 70000  # BINUNICODE, framed


@pytest.mark.parametrize("text, code", [
    ("```python\nprint(1)\n```", "print(1)\n"),
    ("```py\nprint(1)\n```", "print(1)\n"),
    ("```\nprint(2)\n```", "print(2)\n"),
    ("draft:\n```python\nprint(1)\n```\nfinal:\n```python\nprint(3)\n```\n", "print(3)\n"),  # the last block
    ("```python\nprint(1)\n```\nThe output:\n```text\n1\n```", "print(1)\n"),  # a non-Python block after it
    ("<think>\n```python\nprint(0)\n```\n</think>\nNo code in the answer.", None),  # drafts while thinking
    ("```python\nprint(1)", None),  # unterminated: cut by the length limit
    ("no code at all", None),
])
def test_the_final_python_block_is_extracted(text, code):
    assert extract_code(text) == code


def test_stdout_and_value_comparison_rules():
    assert stdout_matches("3\n", "3") and stdout_matches("  1  2 \r\n3\n\n", "1 2\n3")
    assert stdout_matches("1.0 2.50\n", "1 2.5") and not stdout_matches("1.01", "1")
    assert not stdout_matches("3\n4", "3") and not stdout_matches("", "3") and not stdout_matches("yes", "YES")
    assert value_matches([1, 2], [1, 2]) and not value_matches([2, 1], [1, 2])
    assert value_matches(5, [5], first_of_list=True) and not value_matches(5, [5])
    assert read_tests({"tests": json.dumps([{"input": ["1", "2"], "output": [3]}])}).inputs == ["1\n2"]
    assert read_tests({"question": "no tests here"}) is None


# ---- adversarial programs: each contained, the sample beside it scored normally ----------------------------------------
ADVERSARIAL = {
    "infinite loop": "while True:\n    pass",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
    "memory bomb": "blocks = []\nwhile True:\n    blocks.append(bytearray(64 << 20))",
    "writes outside its dir": "open('/etc/forklight_escaped', 'w').write('x')\nprint(3)",
    "kills its parent's group": "import os\nos.killpg(os.getpgid(os.getppid()), 9)",
    "kills its parent": "import os\nos.kill(os.getppid(), 9)",
    "floods stdout": "import sys\nwhile True:\n    sys.stdout.write('3\\n' * 10000)",
    "os.system": "import os\nos.system('kill -9 -1; echo 3')",
    "exits before the tests": "import sys\nsys.exit(0)\nprint(3)",
    "forges the runner's report": ("import os\nfake = b'{\"test\": 1, \"status\": \"ok\", \"stdout\": \"4\"}\\n'\n"
                                   "for fd in range(64):\n    try:\n        os.write(fd, fake)\n    except OSError:\n"
                                   "        pass\nprint(3)"),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_programs_score_zero_and_the_next_sample_scores_normally(name):
    verifier = CodeVerifier(test_timeout_s=1.0, program_timeout_s=10.0, memory_mb=256, max_processes=6, workers=2)
    tests = [{"input": "1 2", "output": "3"}, {"input": "2 2", "output": "4"}]
    completions = [fenced(ADVERSARIAL[name]), fenced(STDIN_PROGRAMS["correct"][0])]
    scores = verifier(completions, [None, None], tests=[tests, tests])
    assert scores[1] == 1.0 and scores[0] < 1.0, scores  # "3" passes at most the first test
    assert not os.path.exists("/etc/forklight_escaped")
    assert verifier([fenced(STDIN_PROGRAMS["correct"][0])], [None], tests=[tests]) == [1.0]


# ---- through forklight's reward path -----------------------------------------------------------------------------------
def test_resolve_and_weighted_format_terms():
    verifier, extract = resolve_verifier([{"class_path": "code", "init_args": {"test_timeout_s": 1.0, "workers": 1}},
                                          {"function": "think_format", "weight": 0.1}])
    completions = ["<think>add them</think>" + fenced(STDIN_PROGRAMS["correct"][0]), fenced("print(0)")]
    tests = [{"input": "1 2", "output": "3"}]
    scores, outcome = score_batch(verifier, [None], [{"tests": tests}], completions, [2], timeout_s=60)
    assert outcome == "ok" and scores == pytest.approx([1.1, 0.0])
    assert extract(completions[1]) == "print(0)\n"  # votes group identical programs
    assert run_verifier(verifier, completions[:1], [None], {"tests": [tests]}, timeout_s=None) == ([1.1], "ok")


def test_a_correct_program_earns_reward_one_through_the_rl_module(tmp_path):
    from forklight.modules.grpo import GRPOModule
    from tests.conftest import toy_batch

    module = GRPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3, group_size=3,
                        max_completion_tokens=4, verifier={"class_path": "code", "init_args": {"workers": 1}})
    module.configure_model()
    programs = [fenced("print(3)"), fenced("print(4)"), "no code"]
    module.rollouts = fake_rollouts(lambda tag: programs[tag])
    batch = toy_batch(2)
    batch.columns = [{"tests": [{"input": "", "output": "3"}]}, {"tests": [{"input": "", "output": "4"}]}]
    logged = {}
    module.log = lambda key, value, **kwargs: logged.__setitem__(key, value)
    groups = module.rollouts(batch, [[0, 1, 2], [0, 1, 2]], 0)
    rewards, valid = module.rewards(batch, groups)
    assert torch.equal(rewards, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])) and bool(valid.all())
    assert logged["rollout/reward_errors"] == 0 and logged["rollout/reward_timeouts"] == 0


@pytest.mark.slow
def test_grpo_trains_with_the_code_verifier_through_the_cli(tmp_path, monkeypatch):
    from forklight.cli import main
    from forklight.rewards.sandbox import Sandbox

    programs, run_many = [], Sandbox.run_many
    monkeypatch.setattr(Sandbox, "run_many", lambda self, jobs: programs.extend(jobs) or run_many(self, jobs))
    export = tiny_export(tmp_path)
    main(["fit", "-c", str(CONFIGS / "grpo.yaml"), "-c", str(CONFIGS / "overlays" / "code.yaml"),
          *tiny_overrides(tmp_path, max_steps=2), "--trainer.log_every_n_steps=1", "--model.init_args.num_fork_tokens=3",
          f"--model.init_args.init_from={export}", "--model.init_args.group_size=3",
          "--model.init_args.max_completion_tokens=24", "--data.init_args.batch_size=2",
          f"--data.init_args.train={FIXTURE / 'train.jsonl'}", f"--data.init_args.val={FIXTURE / 'test.jsonl'}",
          f"--data.init_args.test={FIXTURE / 'test.jsonl'}"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "grpo").glob("version_*")))).Reload()
    assert len(events.Scalars("rollout/reward_mean")) == 2 and len(programs) >= 2 * 2 * 3  # every rollout ran
    for key in ("rollout/reward_errors", "rollout/reward_timeouts", "val/reward_errors"):
        assert all(event.value == 0.0 for event in events.Scalars(key)), key
    assert (tmp_path / "grpo" / "version_0" / "checkpoints" / "last.ckpt").exists()


def test_the_shipped_fixture_solutions_pass_their_own_tests():
    rows = [json.loads(line) for name in ("train.jsonl", "test.jsonl") for line in (FIXTURE / name).read_text().splitlines()]
    verifier = CodeVerifier(scoring="all", test_timeout_s=2.0, workers=2)
    traces = [trace["text"] if isinstance(trace, dict) else trace for row in rows for trace in row["traces"]]
    tests = [row["tests"] for row in rows for _ in row["traces"]]
    assert len(rows) >= 12 and verifier(traces, [None] * len(traces), tests=tests) == [1.0] * len(traces)
