"""Math verifiers: ``exact_integer`` (the last integer) and ``math`` (math-verify, symbolic, gold first)."""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Sequence
from functools import lru_cache

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
            importlib.import_module("math_verify")
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
