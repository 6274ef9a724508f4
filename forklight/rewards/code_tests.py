"""What a coding problem's tests are, read from each layout, and how a program's output is checked against them.

Test layouts (the record's columns, as the data loaders keep them):

- LiveCodeBench: ``public_test_cases`` / ``private_test_cases``, each a list (or a JSON string of a list) of
  ``{input, output, testtype: stdin | functional}``; ``metadata`` (a dict or a JSON string) names ``func_name``.
  Private cases on the hub are compressed: base64 of zlib of a pickle of the JSON string. They are read without
  unpickling: :func:`pickled_string` walks the pickle's opcodes with :mod:`pickletools` and accepts a pickle that
  holds one string and nothing else (LiveCodeBench's own loader calls ``pickle.loads``, which can run code).
  Functional inputs are one JSON value per line (the arguments), outputs one JSON value;
- APPS / TACO: ``input_output``, a dict or JSON string ``{inputs, outputs, fn_name?}``: stdin text (or a list of
  lines) per test, or with ``fn_name`` an argument list per test and the return value (``[x]`` also accepts ``x``,
  as APPS's own checker does);
- plain: ``tests``, a list (or JSON string) of ``{input, output}`` stdin/stdout pairs.

Stdout is compared line by line after stripping the whole text and each line, with runs of whitespace inside a
line counted as one; a line whose tokens all read as decimals also matches by value (``1.0`` = ``1``, as
LiveCodeBench's checker). Call-based tests compare the JSON of the return value (tuples become lists).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import pickletools
import zlib
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

MAX_DECOMPRESSED_BYTES = 1 << 30  # a zlib bomb in a test column stops here


@dataclass(frozen=True)
class CodeTests:
    """A record's tests, read from its layout."""

    mode: str  # "stdin" (input text -> stdout) or "call" (arguments -> return value)
    inputs: list  # stdin: the input text of each test; call: the argument list of each test
    outputs: list  # stdin: the expected stdout of each test; call: the expected return value
    fn_name: str | None = None  # call: the function (or Solution method) to call
    first_of_list: bool = False  # call (APPS): an expected [x] also accepts x


_PICKLE_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_PICKLE_FRAMING = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "STOP"}


def pickled_string(data: bytes) -> str:
    """The one string a pickle holds, read from its opcodes (:func:`pickletools.genops`): nothing is executed or
    imported, and a pickle that holds anything but one string is refused with ValueError."""
    strings = []
    for opcode, argument, _ in pickletools.genops(data):
        if opcode.name in _PICKLE_STRINGS:
            strings.append(argument)
        elif opcode.name not in _PICKLE_FRAMING:
            raise ValueError(f"the compressed test cases hold a pickle opcode {opcode.name}, not only a string: "
                             "refused (forklight never unpickles)")
    if len(strings) != 1:
        raise ValueError(f"the compressed test cases hold {len(strings)} strings, expected one")
    return strings[0]


def decode_livecodebench_cases(value) -> list[dict]:
    """LiveCodeBench test cases: a list, a JSON string, or base64(zlib(pickle(JSON string))) as the hub's
    ``private_test_cases`` (read without unpickling, :func:`pickled_string`)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return []
    if isinstance(value, list):
        return value
    if not isinstance(value, str):
        raise ValueError(f"test cases are a list or a string, got {type(value).__name__}")
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        pass
    try:
        packed = base64.b64decode(value.encode(), validate=True)
        inflater = zlib.decompressobj()
        raw = inflater.decompress(packed, MAX_DECOMPRESSED_BYTES)
    except (binascii.Error, zlib.error) as error:
        raise ValueError(f"test cases are neither JSON nor base64+zlib: {error}") from error
    if inflater.unconsumed_tail:
        raise ValueError(f"compressed test cases inflate past {MAX_DECOMPRESSED_BYTES} bytes")
    return json.loads(pickled_string(raw))


def _json(value):
    return json.loads(value) if isinstance(value, str) else value


def _livecodebench_tests(row: dict, cases: str) -> CodeTests | None:
    chosen = []
    if cases in ("all", "public"):
        chosen += decode_livecodebench_cases(row.get("public_test_cases"))
    if cases in ("all", "private"):
        chosen += decode_livecodebench_cases(row.get("private_test_cases"))
    if not chosen:
        return None
    kinds = {case.get("testtype", "stdin") for case in chosen}
    if len(kinds) != 1 or not kinds <= {"stdin", "functional"}:
        raise ValueError(f"test types {sorted(kinds)}: expected all 'stdin' or all 'functional'")
    if kinds == {"stdin"}:
        return CodeTests("stdin", [case["input"] for case in chosen], [case["output"] for case in chosen])
    fn_name = (_json(row.get("metadata")) or {}).get("func_name")
    if not fn_name:
        raise ValueError("functional tests need metadata.func_name")
    arguments = [[json.loads(line) for line in case["input"].split("\n") if line.strip()] for case in chosen]
    return CodeTests("call", arguments, [json.loads(case["output"]) for case in chosen], fn_name)


def lines_of(value) -> str:
    """A test's text: a list of lines joined with newlines."""
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


def _apps_tests(row: dict) -> CodeTests | None:
    spec = _json(row["input_output"]) or {}
    inputs, outputs = spec.get("inputs") or [], spec.get("outputs") or []
    if len(inputs) != len(outputs):
        raise ValueError(f"input_output has {len(inputs)} inputs and {len(outputs)} outputs")
    if not inputs:
        return None
    if spec.get("fn_name"):
        return CodeTests("call", [list(args) if isinstance(args, list) else [args] for args in inputs], outputs,
                         spec["fn_name"], first_of_list=True)
    return CodeTests("stdin", [lines_of(x) for x in inputs], [lines_of(x) for x in outputs])


def read_tests(row: dict, cases: str = "all") -> CodeTests | None:
    """A record's tests from its columns (LiveCodeBench, APPS/TACO or plain layout; module docstring), or None
    when it has none. ``cases``: ``all``, ``public`` or ``private`` (LiveCodeBench). Malformed tests raise
    ValueError."""
    if row.get("public_test_cases") is not None or row.get("private_test_cases") is not None:
        return _livecodebench_tests(row, cases)
    if row.get("input_output") is not None:
        return _apps_tests(row)
    if row.get("tests") is not None:
        tests = _json(row["tests"])
        if not isinstance(tests, list) or not all(isinstance(t, dict) and {"input", "output"} <= set(t) for t in tests):
            raise ValueError("'tests' must be a list of {input, output}")
        return CodeTests("stdin", [lines_of(t["input"]) for t in tests], [lines_of(t["output"]) for t in tests]) if tests else None
    return None


def _tokens(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().split("\n")]


def _as_decimals(tokens: list[str]) -> list[Decimal] | None:
    try:
        return [Decimal(token) for token in tokens]
    except InvalidOperation:
        return None


def stdout_matches(actual: str, expected: str) -> bool:
    """Whether a program's stdout is the expected one: the same lines after stripping, whitespace runs inside a
    line counted as one, and a line of numbers also equal by decimal value."""
    got, want = _tokens(actual), _tokens(expected)
    if len(got) != len(want):
        return False
    for got_line, want_line in zip(got, want):
        if got_line != want_line:
            got_numbers, want_numbers = _as_decimals(got_line), _as_decimals(want_line)
            if got_numbers is None or want_numbers is None or got_numbers != want_numbers:
                return False
    return True


def value_matches(actual, expected, first_of_list: bool = False) -> bool:
    """Whether a returned value (as JSON gives it back) is the expected one (APPS: ``[x]`` also accepts ``x``)."""
    if actual == expected:
        return True
    if isinstance(actual, float) and isinstance(expected, (int, float)) and math.isnan(actual) and expected != expected:
        return True
    return first_of_list and isinstance(expected, list) and len(expected) > 0 and actual == expected[0]
