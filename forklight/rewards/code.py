"""The ``code`` verifier: runs a completion's final Python code block against the record's tests in the sandbox.

The tests come from the record's columns in LiveCodeBench, APPS/TACO or plain layout
(:mod:`forklight.rewards.code_tests`, which also holds the comparison rules). Programs run through
:class:`forklight.rewards.sandbox.Sandbox`; inside it :mod:`forklight.rewards.code_harness` runs every test in a
fresh fork with LiveCodeBench's import prelude. The expected outputs never enter the sandbox.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Sequence

from forklight.rewards.code_tests import CodeTests, lines_of, read_tests, stdout_matches, value_matches
from forklight.rewards.format import final_answer
from forklight.rewards.sandbox import Sandbox, SandboxJob, SandboxLimits, SandboxResult

log = logging.getLogger(__name__)

HARNESS_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code_harness.py")
PRELUDE = (  # LiveCodeBench's import_string (lcb_runner/evaluation/testing_util.py), before every program
    "from string import *\nfrom re import *\nfrom datetime import *\nfrom collections import *\nfrom heapq import *\n"
    "from bisect import *\nfrom copy import *\nfrom math import *\nfrom random import *\nfrom statistics import *\n"
    "from itertools import *\nfrom functools import *\nfrom operator import *\nfrom io import *\nfrom sys import *\n"
    "from json import *\nfrom builtins import *\nfrom typing import *\nimport string\nimport re\nimport datetime\n"
    "import collections\nimport heapq\nimport bisect\nimport copy\nimport math\nimport random\nimport statistics\n"
    "import itertools\nimport functools\nimport operator\nimport io\nimport sys\nimport json\n"
    "sys.setrecursionlimit(50000)\n"
)
_FENCE = re.compile(r"```[ \t]*([\w+.#-]*)[^\n]*\n(.*?)```", re.DOTALL)
PYTHON_FENCES = {"", "python", "py", "python3", "py3"}


def extract_code(text: str, require_block: bool = True) -> str | None:
    """The last fenced code block (```` ```python ```` or untagged) of the answer (after ``</think>``), or None;
    with ``require_block=False`` an answer without a block is the program itself."""
    answer = final_answer(text)
    blocks = [body for language, body in _FENCE.findall(answer) if language.lower() in PYTHON_FENCES]
    if blocks:
        return blocks[-1] if blocks[-1].strip() else None
    return None if require_block or not answer.strip() else answer


def code_block_format(completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
    """1.0 when the answer (after ``</think>``) holds a non-empty fenced Python block (a shaping term for ``code``)."""
    return [1.0 if extract_code(text) is not None else 0.0 for text in completions]


class CodeVerifier:
    """Scores a completion's final Python code block by the record's tests, run in the sandbox.

    A completion without a code block scores 0 (``counts["no_code"]``); a record without tests gives None (skipped,
    ``no_tests``), as does one whose tests cannot be read (``bad_tests``, logged). Programs that fail, time out or
    blow a limit fail their tests; they are counted per program (``timeouts``, ``errors``). A sandbox that cannot
    set up raises, so the batch counts as a reward error (``rollout/reward_errors``).
    """

    handles_timeouts = True  # every program has its own wall-clock limit: a call cannot hang
    uses_gold_answers = False  # the tests are the gold: records need no ``answer``

    def __init__(
        self,
        scoring: str = "fraction",
        test_cases: str = "all",
        max_tests: int | None = None,
        test_timeout_s: float = 6.0,
        program_timeout_s: float = 60.0,
        memory_mb: int = 1024,
        max_processes: int = 8,
        output_bytes: int = 1 << 20,
        require_code_block: bool = True,
        workers: int | None = None,
        python: str | None = None,
        hidden_paths: list[str] | None = None,
        unsafe_without_namespaces: bool = False,
    ) -> None:
        """
        Args:
            scoring: ``fraction`` (the share of tests passed; a shaped reward) or ``all`` (1.0 only when every
                test passes, as LiveCodeBench's pass@1; the run then stops at a program's first failing test).
                Either way a test past ``test_timeout_s`` ends the program's run and the tests after it fail.
            test_cases: LiveCodeBench's ``all``, ``public`` (faster rewards) or ``private`` cases.
            max_tests: run at most this many tests per record (the first ones; null = all).
            test_timeout_s: wall-clock limit of one test (LiveCodeBench: 6 s); its CPU limit is one second more.
            program_timeout_s: wall-clock limit of one program's whole test run; tests not reached by then fail.
            memory_mb: address-space limit of each process (RLIMIT_AS).
            max_processes: processes and threads a program may hold at once, the test runner's two included.
            output_bytes: stdout kept per test (at least twice the longest expected output); more fails the test.
            require_code_block: the program is the answer's last fenced Python block; false: an answer without
                one is run whole (data whose answers are bare programs, or the toy tokenizer, which has no backtick).
            workers: programs run at once (default: the CPU count, at most 32).
            python: interpreter for the programs (default: the trainer's; standard library only).
            hidden_paths: directories programs must not read, besides /root, /home and /run: put the data set's
                directory here when other users may read it, or a program could print the expected outputs.
            unsafe_without_namespaces: run programs even where the kernel gives no namespaces (no network
                isolation, host filesystem visible); off: such a machine refuses to start (docs/verifiers.md).
        """
        if scoring not in ("fraction", "all"):
            raise ValueError(f"code verifier: scoring must be 'fraction' or 'all', got {scoring!r}")
        if test_cases not in ("all", "public", "private"):
            raise ValueError(f"code verifier: test_cases must be 'all', 'public' or 'private', got {test_cases!r}")
        if max_tests is not None and max_tests < 1:
            raise ValueError(f"code verifier: max_tests must be >= 1 or null, got {max_tests}")
        if test_timeout_s <= 0 or program_timeout_s <= 0:
            raise ValueError("code verifier: test_timeout_s and program_timeout_s must be > 0")
        if max_processes < 3:
            raise ValueError(f"code verifier: max_processes must be >= 3 (the runner, a test, one more), got {max_processes}")
        self.scoring, self.test_cases, self.max_tests = scoring, test_cases, max_tests
        self.test_timeout_s, self.program_timeout_s = test_timeout_s, program_timeout_s
        self.output_bytes, self.require_code_block = output_bytes, require_code_block
        self.limits = SandboxLimits(wall_s=program_timeout_s, cpu_s=math.ceil(program_timeout_s) + 1,
                                    memory_mb=memory_mb, max_processes=max_processes)
        self.sandbox = Sandbox(self.limits, workers=workers, python=python, hidden_paths=hidden_paths or (),
                               unsafe_without_namespaces=unsafe_without_namespaces)
        self.sandbox.check()  # refuse now, with what to do, rather than after the first rollouts
        with open(HARNESS_PATH) as handle:
            self.harness = handle.read()
        self.counts: Counter[str] = Counter()

    def extract_answer(self, text: str) -> str | None:
        """The program (majority votes group identical programs)."""
        return extract_code(text, self.require_code_block)

    def tests(self, row: dict) -> CodeTests | None:
        """The record's tests (:func:`read_tests`), cut to ``max_tests``; None when it has none or they are unreadable."""
        try:
            tests = read_tests(row, self.test_cases)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            self.counts["bad_tests"] += 1
            log.warning("code verifier: a record's tests cannot be read (%s: %s); its samples are skipped",
                        type(error).__name__, error)
            return None
        if tests is not None and self.max_tests is not None:
            cut = slice(0, self.max_tests)
            tests = CodeTests(tests.mode, tests.inputs[cut], tests.outputs[cut], tests.fn_name, tests.first_of_list)
        return tests

    def job(self, code: str, tests: CodeTests) -> SandboxJob:
        """The sandbox run of ``code`` on ``tests``: the harness, the program and the inputs (not the outputs)."""
        longest_output = max((len(lines_of(o)) if tests.mode == "stdin" else len(json.dumps(o)) for o in tests.outputs),
                             default=0)
        output_bytes = max(self.output_bytes, 2 * longest_output + 1024)
        spec = {"mode": tests.mode, "inputs": tests.inputs, "fn_name": tests.fn_name, "prelude": PRELUDE,
                "test_timeout_s": self.test_timeout_s, "output_bytes": output_bytes,
                "stop_on_error": self.scoring == "all"}
        payload = json.dumps(spec)
        megabytes = math.ceil((len(payload) + len(code)) / (1 << 20))
        limits = SandboxLimits(
            wall_s=self.limits.wall_s, cpu_s=self.limits.cpu_s, memory_mb=self.limits.memory_mb,
            max_processes=self.limits.max_processes, file_size_mb=max(16, 2 * megabytes + math.ceil(output_bytes / (1 << 20))),
            disk_mb=max(64, 4 * megabytes + 4 * math.ceil(output_bytes / (1 << 20))),
            output_bytes=len(tests.inputs) * (6 * output_bytes + 4096) + (1 << 16))  # JSON escapes up to 6x
        return SandboxJob(self.harness, files={"solution.py": code, "tests.json": payload}, limits=limits)

    def score(self, tests: CodeTests, result: SandboxResult) -> float:
        """The share of tests passed (``scoring: fraction``) or 1.0/0.0 (``all``) from one sandbox run."""
        if result.setup_error is not None:
            raise RuntimeError(f"the code sandbox failed to start a program: {result.setup_error}")
        passed, outcomes = 0, Counter()
        for line in result.stdout.decode("utf-8", errors="replace").splitlines():
            try:
                report = json.loads(line)
                index = int(report["test"])
                if not 0 <= index < len(tests.inputs):
                    continue
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by the output limit
            outcomes[report.get("status")] += 1
            if report.get("status") != "ok":
                continue
            if tests.mode == "stdin":
                passed += isinstance(report.get("stdout"), str) and stdout_matches(report["stdout"], tests.outputs[index])
            else:
                try:
                    value = json.loads(report["value"])
                except (TypeError, ValueError):
                    continue
                passed += value_matches(value, tests.outputs[index], tests.first_of_list)
        if result.timed_out or outcomes["timeout"]:
            self.counts["timeouts"] += 1
        if outcomes["error"] or outcomes["output_limit"] or result.output_exceeded:
            self.counts["errors"] += 1
        passed = min(passed, len(tests.inputs))
        if self.scoring == "all":
            return float(passed == len(tests.inputs))
        return passed / len(tests.inputs)

    def __call__(self, completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
        scores: list[float | None] = [None] * len(completions)
        parsed: dict[tuple, CodeTests | None] = {}  # per question: score_batch repeats its columns per completion
        jobs, owners = [], []
        for index, completion in enumerate(completions):
            row = {key: values[index] for key, values in columns.items()}
            key = tuple(id(value) for value in row.values())
            if key not in parsed:
                parsed[key] = self.tests(row)
            tests = parsed[key]
            if tests is None:
                self.counts["no_tests"] += 1
                continue
            code = extract_code(completion, self.require_code_block)
            if code is None:
                self.counts["no_code"] += 1
                scores[index] = 0.0
                continue
            jobs.append(self.job(code, tests))
            owners.append((index, tests))
        for (index, tests), result in zip(owners, self.sandbox.run_many(jobs)):
            scores[index] = self.score(tests, result)
        return scores
