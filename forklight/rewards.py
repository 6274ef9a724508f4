"""Verifiers: score completions against gold answers (1.0 correct, 0.0 wrong, None = skip).

A verifier is ``f(completions, answers, **columns) -> list[float | None]`` (``columns``: the
record's other fields, one list each), named here (``exact_integer``, ``math``, ``choice``: multiple-choice letters), given as
``module:function`` or ``{class_path, init_args}``; several combine with weights. ``extract_answer`` gives the answer string
that majority voting (cons@N, cons@k, maj@k) counts; a verifier's optional ``same_answer(a, b)`` says which
of those strings it counts as equal (default: exact string equality).
"""

from __future__ import annotations

import importlib
import logging
import re
import threading
from collections.abc import Callable, Sequence
from functools import lru_cache

log = logging.getLogger(__name__)
_INTEGER = re.compile(r"-?\d+")


def extract_last_integer(text: str) -> str | None:
    """The last integer in ``text`` (normalised, e.g. ``"007"`` -> ``"7"``), or None."""
    found = _INTEGER.findall(text.replace(",", ""))
    return str(int(found[-1])) if found else None


def exact_integer(completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
    """1.0 when the last integer of the completion equals the integer gold answer."""
    scores: list[float | None] = []
    for completion, answer in zip(completions, answers, strict=True):
        gold = extract_last_integer(answer) if answer is not None else None
        if gold is None:
            scores.append(None)
            continue
        scores.append(1.0 if extract_last_integer(completion) == gold else 0.0)
    return scores


_MATH_DELIMITER = re.compile(r"\\boxed|\\\(|\\\[|(?<!\\)\$")  # \boxed, \(, \[ or an unescaped $
_COMMAND_OR_TEXT = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox|operatorname|begin|end)\{[^{}]*\}|\\[A-Za-z]+")
_TWO_WORDS = re.compile(r"[A-Za-z]{2,}\s+[A-Za-z]|[A-Za-z]\s+[A-Za-z]{2,}")  # "not a", "a number"; not "xy + yz"


def gold_as_math(answer: str) -> str:
    """A gold answer as math-verify should read it: bare LaTeX (``2\\sqrt{2}``, ``[-2,7]``) in ``$...$``.

    math-verify only reads LaTeX inside math delimiters; outside them it takes the first number
    (``2\\sqrt{2}`` -> 2) or nothing (``\\frac{\\sqrt{3}}{2}``). Answers already in ``$...$``,
    ``\\(...\\)``, ``\\[...\\]`` or ``\\boxed{}``, and prose (two words in a row outside LaTeX
    commands and ``\\text{}``, e.g. a full solution), are left as they are.
    """
    if _MATH_DELIMITER.search(answer) or _TWO_WORDS.search(_COMMAND_OR_TEXT.sub(" ", answer)):
        return answer
    return "$" + " ".join(answer.splitlines()) + "$"  # inline math is one line


@lru_cache(maxsize=4096)
def _parse_math(text: str, timeout_s: int | None) -> list:
    """math-verify's parse of a gold answer or an extracted answer (``[]`` if unreadable or too slow)."""
    from math_verify import parse

    return parse(gold_as_math(text), parsing_timeout=timeout_s)


class MathVerifier:
    """Math answers with math-verify: ``\\boxed{}`` or a final answer, compared symbolically, gold first.

    Gold answers are read as math (:func:`gold_as_math`): bare LaTeX as datasets store it
    (``2\\sqrt{2}``, ``\\frac{14}{3}``, ``[-2,7]``, ``\\text{(C)}``, ``\\$18.90``) or already in
    ``$...$``/``\\boxed{}``. ``same_answer`` tells majority voting which extracted answers count as
    equal (``1/2``, ``\\frac12``, ``0.5``).

    A completion that cannot be parsed, or whose check runs past ``timeout_s``, scores 0 and is
    counted (``parse_failures``, ``timeouts``); a gold answer that cannot be parsed gives None (the
    sample is skipped) and is counted in ``gold_failures``. math-verify's own timeouts use
    SIGALRM, which only works in a main thread, so elsewhere (a dataloader or trainer thread)
    the batch runs in a spawned worker process, killed if it overruns.
    """

    handles_timeouts = True  # run_verifier calls it in the caller's thread (see there)

    def __init__(self, timeout_s: int = 5) -> None:
        try:
            import math_verify  # noqa: F401
        except ImportError as error:
            raise ImportError("verifier 'math' needs math-verify: pip install 'math-verify[antlr4_13_2]'") from error
        if timeout_s < 1:
            raise ValueError(f"MathVerifier timeout_s must be >= 1 (seconds), got {timeout_s}")
        self.timeout_s = timeout_s
        self.counts = {"parse_failures": 0, "timeouts": 0, "gold_failures": 0}

    def __call__(self, completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
        if threading.current_thread() is threading.main_thread():
            results = _math_scores(list(completions), list(answers), self.timeout_s)
        else:
            results = self._in_worker(list(completions), list(answers))
        scores = []
        for score, outcome in results:
            if outcome in self.counts:
                self.counts[outcome] += 1
            scores.append(score)
        return scores

    def _in_worker(self, completions: list[str], answers: list[str | None]) -> list[tuple[float | None, str]]:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        budget = self.timeout_s * (2 * len(completions) + 1) + 30  # gold + prediction per sample, and start-up
        executor = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return executor.submit(_math_scores, completions, answers, self.timeout_s).result(timeout=budget)
        except FutureTimeout:
            for process in list(getattr(executor, "_processes", {}).values()):
                process.kill()
            return [(0.0, "timeouts")] * len(completions)
        finally:
            executor.shutdown(wait=False, cancel_futures=True)

    def _timeout(self) -> int | None:
        """math-verify's SIGALRM timeout works only in the main thread; elsewhere parsing is unbounded."""
        return self.timeout_s if threading.current_thread() is threading.main_thread() else None

    def extract_answer(self, text: str) -> str | None:
        """The answer math-verify extracts from a completion (its LaTeX string form), for majority voting."""
        from math_verify import parse

        try:
            parsed = parse(text, parsing_timeout=self._timeout())
        except Exception:
            return None
        return str(parsed[-1]) if parsed else None

    def extract_gold(self, answer: str) -> str | None:
        """The gold answer as the verifier reads it (its LaTeX string form), or None if it cannot."""
        parsed = _parse_math(answer, self._timeout())
        return str(parsed[-1]) if parsed else None

    def same_answer(self, first: str, second: str) -> bool:
        """Whether math-verify counts two extracted answers as equal, checked both ways (it is
        gold-first, hence asymmetric). Identical strings are equal; an answer it cannot read, or a
        check past ``timeout_s``, is equal to none other. Outside the main thread (no timeouts)
        only identical strings are equal."""
        if first == second:
            return True
        timeout_s = self._timeout()
        if timeout_s is None:
            return False
        from math_verify import verify
        from math_verify.errors import TimeoutException

        parsed_first, parsed_second = _parse_math(first, timeout_s), _parse_math(second, timeout_s)
        if not parsed_first or not parsed_second:
            return False
        try:
            return bool(verify(parsed_first, parsed_second, timeout_seconds=timeout_s)
                        and verify(parsed_second, parsed_first, timeout_seconds=timeout_s))
        except (Exception, TimeoutException):
            return False


def _math_scores(completions: list[str], answers: list[str | None], timeout_s: int) -> list[tuple[float | None, str]]:
    """(score, outcome) per sample; runs where SIGALRM works (a main thread or a worker process)."""
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    results = []
    for completion, answer in zip(completions, answers, strict=True):
        try:
            gold = parse(gold_as_math(answer), parsing_timeout=timeout_s, raise_on_error=True) if answer else []
        except TimeoutException:
            gold = []
        except Exception:
            gold = []
        if not gold:
            results.append((None, "gold_failures"))
            continue
        try:
            predicted = parse(completion, parsing_timeout=timeout_s, raise_on_error=True)
            if not predicted:
                results.append((0.0, "parse_failures"))
                continue
            correct = verify(gold, predicted, timeout_seconds=timeout_s, raise_on_error=True)
            results.append((1.0 if correct else 0.0, "ok"))
        except TimeoutException:
            results.append((0.0, "timeouts"))
        except Exception:
            results.append((0.0, "parse_failures"))
    return results


_CHOICE_PATTERNS = [  # most explicit first; within a pattern the last match wins
    re.compile(r"\\boxed\{\s*(?:\\text\{\s*)?\(?([A-J])\)?\s*\}?\s*\}"),  # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}
    re.compile(r"(?i:answer)\s*(?:is)?\s*[:：]?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])"),  # Answer: C, the answer is (C)
    re.compile(r"\*\*\s*\(?([A-J])\)?\s*\*\*"),  # **C**, **(C)**
    re.compile(r"(?m)^\s*\(?([A-J])\)?[.)]?\s*$"),  # a line that is only the letter
]


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter of a multiple-choice completion, or None: ``\\boxed{C}``, then "Answer: C" / "the
    answer is (C)", then "**C**", then a line holding only the letter; the last match of the first pattern that
    matches (text after ``</think>`` when there is one). Letters outside ``letters`` are ignored."""
    tail = text.rsplit("</think>", 1)[-1]
    for pattern in _CHOICE_PATTERNS:
        found = [letter for letter in pattern.findall(tail) if letter in letters]
        if found:
            return found[-1]
    return None


class ChoiceVerifier:
    """Multiple choice (A-D, up to A-J): 1.0 when the extracted letter (:func:`extract_choice`) is the gold letter,
    0.0 otherwise (no letter found included); a gold answer that is not a single letter gives None (skipped)."""

    def __init__(self, letters: str = "ABCDEFGHIJ") -> None:
        self.letters = letters

    def extract_answer(self, text: str) -> str | None:
        return extract_choice(text, self.letters)

    def extract_gold(self, answer: str) -> str | None:
        gold = answer.strip().strip("()").upper()
        return gold if len(gold) == 1 and gold in self.letters else None

    def __call__(self, completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
        scores: list[float | None] = []
        for completion, answer in zip(completions, answers, strict=True):
            gold = self.extract_gold(answer) if answer is not None else None
            scores.append(None if gold is None else float(self.extract_answer(completion) == gold))
        return scores


class WeightedVerifiers:
    """Several verifiers as one: the weighted sum of the scores that are not None (None if all are)."""

    def __init__(self, verifiers: list[Callable], weights: list[float]) -> None:
        self.verifiers = verifiers
        self.weights = weights
        self.extract_answer = getattr(verifiers[0], "extract_answer", extract_last_integer)
        self.same_answer = getattr(verifiers[0], "same_answer", None)  # None: exact string equality
        self.handles_timeouts = all(_bounded(verifier) for verifier in verifiers)

    def __call__(self, completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
        totals: list[float | None] = [None] * len(completions)
        for verifier, weight in zip(self.verifiers, self.weights):
            scores = verifier(completions, answers, **columns)
            if len(scores) != len(completions):
                raise ValueError(f"verifier {verifier!r} returned {len(scores)} scores for {len(completions)} completions")
            for index, score in enumerate(scores):
                if score is not None:
                    totals[index] = (totals[index] or 0.0) + weight * float(score)
        return totals


def _bounded(verifier: Callable) -> bool:
    """Whether a verifier cannot hang: forklight's own (math bounds itself with its own timeouts)."""
    return verifier is exact_integer or bool(getattr(verifier, "handles_timeouts", False))


MAX_HUNG_VERIFIER_CALLS = 4
_HUNG: list[threading.Thread] = []  # abandoned verifier calls, while they still run


def run_verifier(
    verifier: Callable, completions: list[str], answers: list[str | None], columns: dict[str, list],
    timeout_s: float | None,
) -> tuple[list[float | None], str]:
    """``(scores, outcome)``: the verifier's scores, or 0.0 for every sample when it fails.

    ``outcome`` is ``"ok"``, ``"error"`` (it raised, or returned the wrong number of scores) or
    ``"timeout"`` (it ran past ``timeout_s``; the limit is per call, i.e. per batch of completions).
    A verifier that is not bounded by itself runs in a daemon thread that is abandoned on timeout
    (Python cannot stop a thread; it finishes or idles in the background without holding the run);
    while ``MAX_HUNG_VERIFIER_CALLS`` abandoned calls still run, new calls are not started and score
    0 as timeouts, so a verifier that always hangs cannot pile up threads. ``timeout_s=None`` calls
    it directly.
    """
    outcome: dict = {}

    def call() -> None:
        try:
            scores = list(verifier(completions, answers, **columns))
            if len(scores) != len(completions):
                raise ValueError(f"returned {len(scores)} scores for {len(completions)} completions")
            outcome["scores"] = scores
        except Exception as error:  # noqa: BLE001 - any failure of user code scores 0
            outcome["error"] = error

    if timeout_s is None or _bounded(verifier):
        call()
    else:
        _HUNG[:] = [thread for thread in _HUNG if thread.is_alive()]
        if len(_HUNG) >= MAX_HUNG_VERIFIER_CALLS:
            log.warning("model.verifier: %d earlier calls still run past model.reward_timeout_s; %d completions "
                        "score 0 without calling it", len(_HUNG), len(completions))
            return [0.0] * len(completions), "timeout"
        worker = threading.Thread(target=call, name="forklight-verifier", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            _HUNG.append(worker)
            log.warning("model.verifier ran past model.reward_timeout_s=%ss on %d completions; they score 0 "
                        "(raise model.reward_timeout_s if it is only slow)", timeout_s, len(completions))
            return [0.0] * len(completions), "timeout"
    if "error" in outcome:
        error = outcome["error"]
        log.warning("model.verifier failed on %d completions (%s: %s); they score 0", len(completions),
                    type(error).__name__, error)
        return [0.0] * len(completions), "error"
    return outcome["scores"], "ok"


def score_batch(verifier: Callable, answers: Sequence[str | None], columns: Sequence[dict], completions: list[str],
                sizes: list[int], timeout_s: float | None) -> tuple[list[float | None], str]:
    """:func:`run_verifier` on ``completions``, ``sizes[q]`` of them per question q, each scored against its
    question's gold answer and extra columns (``answers``, ``columns``: one per question)."""
    repeated = [answer for answer, size in zip(answers, sizes, strict=True) for _ in range(size)]
    keys = columns[0] if columns else {}
    extra = {key: [row.get(key) for row, size in zip(columns, sizes) for _ in range(size)] for key in keys}
    return run_verifier(verifier, completions, repeated, extra, timeout_s)


def gold_answer_parser(verifier: Callable, extract_answer: Callable[[str], str | None]) -> Callable | None:
    """How the verifier reads a gold answer, where it says so (``exact_integer``, ``math``, or a
    verifier with an ``extract_gold`` or ``extract_answer`` method); None for other user verifiers
    (not checked). ``extract_gold`` (``math``: gold answers are bare LaTeX) wins over ``extract_answer``."""
    first = verifier.verifiers[0] if isinstance(verifier, WeightedVerifiers) else verifier
    if hasattr(first, "extract_gold"):
        return first.extract_gold
    if first is exact_integer or hasattr(first, "extract_answer"):
        return extract_answer
    return None


VERIFIERS: dict[str, Callable] = {"exact_integer": exact_integer, "math": MathVerifier, "choice": ChoiceVerifier}
NOT_BUILT = {"code": "sandboxed code execution is not built yet; configs/eval/livecodebench.yaml reads LiveCodeBench's "
                     "data and prompts but cannot score them: meanwhile `forklight predict` with "
                     "--model.init_args.verifier=exact_integer writes the completions (no gold answers: no scores)"}
ANSWER_EXTRACTORS: dict[str, Callable[[str], str | None]] = {"exact_integer": extract_last_integer}


def resolve_callable(spec: str, registry: dict[str, Callable], key: str) -> Callable:
    """A registered name, or ``package.module:function`` (imported only when configured)."""
    if spec in registry:
        return registry[spec]
    if ":" not in spec:
        raise ValueError(f"{key}={spec!r} is neither one of {sorted(registry)} nor 'package.module:function'")
    module_name, _, attribute = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{key}={spec!r} cannot be imported: {error}") from error


VerifierSpec = str | dict


def _one_verifier(spec: VerifierSpec, key: str) -> tuple[Callable, float]:
    """(verifier, weight) from ``name``, ``module:function`` or ``{class_path, init_args, weight}``."""
    if isinstance(spec, str):
        if spec in NOT_BUILT:
            raise ValueError(f"{key}={spec!r}: {NOT_BUILT[spec]}")
        found = resolve_callable(spec, VERIFIERS, key)
        return (found() if isinstance(found, type) else found), 1.0
    if not isinstance(spec, dict):
        raise ValueError(f"{key}: expected a name, 'module:function' or a mapping, got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args", "function", "weight"}
    if unknown or ("class_path" in spec) == ("function" in spec):
        raise ValueError(f"{key}: a mapping needs exactly one of 'class_path' (with optional 'init_args') or "
                         f"'function', plus an optional 'weight'; got keys {sorted(spec)}")
    weight = float(spec.get("weight", 1.0))
    if "function" in spec:
        return _one_verifier(spec["function"], key)[0], weight
    path = spec["class_path"]
    if path in VERIFIERS and isinstance(VERIFIERS[path], type):
        cls = VERIFIERS[path]
    else:
        module_name, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{key}: class_path {path!r} cannot be imported: {error}") from error
    try:
        return cls(**spec.get("init_args", {})), weight
    except TypeError as error:
        raise ValueError(f"{key}: cannot build {path} with init_args {spec.get('init_args', {})}: {error}") from error


def resolve_verifier(spec: VerifierSpec | list[VerifierSpec]) -> tuple[Callable, Callable[[str], str | None]]:
    """(verifier, answer extractor) for ``model.verifier``: a name (``exact_integer``, ``math``, ``choice``),
    ``package.module:function``, ``{class_path, init_args, weight}``, or a list of these (weighted
    sum). Majority voting uses the first verifier's ``extract_answer`` (default: the last integer)."""
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise ValueError("model.verifier is an empty list; name at least one verifier")
    built = [_one_verifier(item, f"model.verifier[{i}]" if isinstance(spec, list) else "model.verifier")
             for i, item in enumerate(specs)]
    if len(built) == 1 and built[0][1] == 1.0:
        verifier = built[0][0]
    else:
        verifier = WeightedVerifiers([v for v, _ in built], [w for _, w in built])
    first = specs[0] if isinstance(specs[0], str) else None
    extractor = (ANSWER_EXTRACTORS.get(first) if first else None) or getattr(verifier, "extract_answer", extract_last_integer)
    return verifier, extractor
