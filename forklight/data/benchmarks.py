"""Evaluation benchmarks as data: each benchmark's own row layout read into forklight's question records.

``data.init_args.benchmark: aime24 | aime25 | math500 | gpqa_diamond | livecodebench`` reads the ``test`` (and
``val``/``predict``) source in that benchmark's layout: its hub dataset (:attr:`Benchmark.hub`, the config and split
it is published under) when the source is unset, or a local ``.jsonl``/``.json``/``.parquet`` file or a local
directory in the hub layout (read with ``datasets.load_dataset``) offline. Each row becomes a question without
traces: ``{id, prompt, answer}`` plus the row's other fields as columns (the verifier sees them).

- ``aime24`` (``HuggingFaceH4/aime_2024``, split ``train``) and ``aime25`` (``yentinglin/aime_2025``, ``train``):
  ``problem``, ``answer`` (an integer), ``id``;
- ``math500`` (``HuggingFaceH4/MATH-500``, ``test``): ``problem``, ``answer`` (LaTeX), ``unique_id``, ``subject``,
  ``level``;
- ``gpqa_diamond`` (``Idavidrein/gpqa``, config ``gpqa_diamond``, ``train``): ``Question``, ``Correct Answer``,
  ``Incorrect Answer 1..3``, ``Record ID``. The four options are shuffled with a seed per question (``data.seed``
  and the record id: the same order on every run and rank), the prompt is multiple choice and the gold answer is
  the correct option's letter (the ``choice`` verifier extracts letters);
- ``livecodebench`` (``livecodebench/code_generation_lite``, ``test``): ``question_id``, ``question_content``,
  ``starter_code``, ``public_test_cases``/``private_test_cases``, ``metadata``; the prompt is LiveCodeBench's own.
  the tests stay columns for the ``code`` verifier (``forklight.rewards.code``: sandboxed execution).

Math prompts end with DeepSeek-R1's instruction (reason step by step, the final answer in ``\\boxed{}``), as the
paper's evaluation does; ``data.init_args.prompt_template`` still wraps the prompt when set.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from forklight.data.loading import parse_record_rows
from forklight.data.records import FieldNames, LoadReport, QuestionRecord, RecordError, Row, read_rows

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_TEMPLATE = (  # lighteval's gpqa:diamond (instruct) prompt
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of {letters}. Think step by step before "
    "answering.\n\n{question}\n\n{options}"
)
LETTERS = "ABCDEFGHIJ"


def _field(row: Row, name: str, loc: str, benchmark: str) -> Any:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RecordError(f"{loc}: the {benchmark} row has no '{name}' (its fields: {sorted(row)}); give the "
                          f"benchmark's own layout, or unset data.benchmark for forklight's", "missing_field")
    return value


def _math_row(problem: str, answer: str, question_id: str, extra: dict) -> Row:
    return {"id": question_id, "prompt": f"{problem.strip()}\n\n{MATH_INSTRUCTION}", "answer": answer, **extra}


def aime_row(row: Row, loc: str, seed: int, benchmark: str = "aime") -> Row:
    """AIME (``problem``, ``answer``, ``id``): the problem with the math instruction, the integer answer."""
    problem, answer = _field(row, "problem", loc, benchmark), _field(row, "answer", loc, benchmark)
    extra = {key: row[key] for key in ("url", "year") if row.get(key) is not None}
    return _math_row(problem, str(answer).strip(), str(row.get("id", loc)), extra)


def math500_row(row: Row, loc: str, seed: int) -> Row:
    """MATH-500 (``problem``, ``answer``, ``unique_id``, ``subject``, ``level``)."""
    problem, answer = _field(row, "problem", loc, "math500"), _field(row, "answer", loc, "math500")
    extra = {key: row[key] for key in ("subject", "level") if row.get(key) is not None}
    return _math_row(problem, str(answer), str(row.get("unique_id", loc)), extra)


def shuffled_options(correct: str, incorrect: list[str], seed: int, question_id: str) -> tuple[list[str], str]:
    """The options in an order drawn from (``seed``, ``question_id``) alone, and the correct one's letter."""
    options = [correct, *incorrect]
    order = list(range(len(options)))
    random.Random(f"{seed}:{question_id}").shuffle(order)  # a str seed: the same order in every process
    shuffled = [options[i] for i in order]
    return shuffled, LETTERS[order.index(0)]


def choice_prompt(question: str, options: list[str]) -> str:
    letters = LETTERS[: len(options)]
    listed = "\n".join(f"{letter}) {option.strip()}" for letter, option in zip(letters, options))
    return CHOICE_TEMPLATE.format(letters=", ".join(letters), question=question.strip(), options=listed)


def gpqa_row(row: Row, loc: str, seed: int) -> Row:
    """GPQA (``Question``, ``Correct Answer``, ``Incorrect Answer 1..3``, ``Record ID``): options shuffled per
    question, the gold answer a letter, the options kept as the ``choices`` column."""
    question = _field(row, "Question", loc, "gpqa_diamond")
    correct = _field(row, "Correct Answer", loc, "gpqa_diamond")
    incorrect = [_field(row, f"Incorrect Answer {k}", loc, "gpqa_diamond") for k in (1, 2, 3)]
    question_id = str(row.get("Record ID") or loc)
    options, letter = shuffled_options(str(correct), [str(x) for x in incorrect], seed, question_id)
    extra = {key: row[key] for key in ("High-level domain", "Subdomain") if row.get(key) is not None}
    return {"id": question_id, "prompt": choice_prompt(str(question), options), "answer": letter,
            "choices": options, **extra}


LCB_SYSTEM = ("You will be given a question (problem specification) and will generate a correct Python program that "
              "matches the specification and passes all tests.")


def livecodebench_row(row: Row, loc: str, seed: int) -> Row:
    """LiveCodeBench code generation (``question_id``, ``question_content``, ``starter_code``, tests, ``metadata``):
    LiveCodeBench's prompt; the tests and metadata kept as columns for the code verifier."""
    content = _field(row, "question_content", loc, "livecodebench")
    starter = row.get("starter_code") or ""
    if starter.strip():
        tail = ("You will use the following starter code to write the solution to the problem and enclose your "
                f"code within delimiters.\n```python\n{starter}\n```")
    else:
        tail = ("Read the inputs from stdin solve the problem and write the answer to stdout (do not directly test "
                "on the sample inputs). Enclose your code within delimiters as follows. Ensure that when the python "
                "program runs, it reads the inputs, runs the algorithm and writes output to STDOUT.\n"
                "```python\n# YOUR CODE HERE\n```")
    metadata = row.get("metadata") or "{}"
    extra = {key: row[key] for key in ("public_test_cases", "private_test_cases", "platform", "difficulty",
                                       "contest_date", "question_title") if row.get(key) is not None}
    return {"id": str(_field(row, "question_id", loc, "livecodebench")),
            "prompt": f"{LCB_SYSTEM}\n\nQuestion: {content.strip()}\n\n{tail}",
            "metadata": json.loads(metadata) if isinstance(metadata, str) else metadata, **extra}


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: where it is published and how its rows become questions."""

    name: str
    hub: str  # datasets name
    hub_split: str  # the split it is published as
    convert: Callable[[Row, str, int], Row]  # (row, location, seed) -> a prompts-layout row
    verifier: str  # the verifier its configs use
    hub_config: str | None = None  # datasets config name


BENCHMARKS: dict[str, Benchmark] = {
    "aime24": Benchmark("aime24", "HuggingFaceH4/aime_2024", "train",
                        lambda row, loc, seed: aime_row(row, loc, seed, "aime24"), "math"),
    "aime25": Benchmark("aime25", "yentinglin/aime_2025", "train",
                        lambda row, loc, seed: aime_row(row, loc, seed, "aime25"), "math"),
    "math500": Benchmark("math500", "HuggingFaceH4/MATH-500", "test", math500_row, "math"),
    "gpqa_diamond": Benchmark("gpqa_diamond", "Idavidrein/gpqa", "train", gpqa_row, "choice",
                              hub_config="gpqa_diamond"),
    "livecodebench": Benchmark("livecodebench", "livecodebench/code_generation_lite", "test", livecodebench_row,
                               "code"),
}


def benchmark_rows(name: str, source: str | None, seed: int) -> Iterator[tuple[str, Row | RecordError]]:
    """``(location, row)`` of benchmark ``name`` from ``source`` (a file, a local dir in the hub layout, or a
    ``datasets`` name; unset: the benchmark's hub dataset), each row in forklight's prompts layout."""
    benchmark = BENCHMARKS[name]
    config = benchmark.hub_config if source is None or not os.path.isfile(source) else None  # a hub name or dir
    for loc, row in read_rows(source or benchmark.hub, benchmark.hub_split, config):
        if isinstance(row, RecordError) or not isinstance(row, dict):
            yield loc, row
            continue
        try:
            yield loc, benchmark.convert(row, loc, seed)
        except RecordError as error:
            yield loc, error


def load_benchmark(name: str, source: str | None, seed: int, on_bad_record: str = "error"
                   ) -> tuple[list[QuestionRecord], LoadReport]:
    """The questions of benchmark ``name`` (:func:`benchmark_rows`), validated like any prompts file."""
    report = LoadReport(path=source or BENCHMARKS[name].hub)
    records = parse_record_rows(benchmark_rows(name, source, seed), fields=FieldNames(), layout="prompts",
                                on_bad_record=on_bad_record, report=report, questions_only=True)
    if not records:
        first = f" (first problem: {report.skipped[0]})" if report.skipped else ""
        raise RecordError(f"no {name} questions in {report.path}: {report.rows_read} rows read, "
                          f"{len(report.skipped)} skipped{first}")
    return records, report
