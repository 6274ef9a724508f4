"""Verifiers: score completions against gold answers (1.0 correct, 0.0 wrong, None = skip).

A verifier is ``f(completions, answers, **columns) -> list[float | None]`` (``columns``: the record's other
fields, one list each), named here, given as ``module:function`` or ``{class_path, init_args}``; several
combine with weights. One room per family:

- :mod:`~forklight.rewards.math`: ``exact_integer`` (the last integer), ``math`` (math-verify);
- :mod:`~forklight.rewards.choice`: ``choice`` (multiple-choice letters);
- :mod:`~forklight.rewards.code`: ``code`` (a program run against the record's tests, read by
  :mod:`~forklight.rewards.code_tests`, in :mod:`~forklight.rewards.sandbox`), ``code_block_format``;
- :mod:`~forklight.rewards.format`: ``think_format``, ``boxed_format``, ``overlong_penalty`` (shaping terms).

``extract_answer`` gives the answer string that majority voting (cons@N, cons@k, maj@k) counts; a verifier's
optional ``same_answer(a, b)`` says which of those strings it counts as equal (default: exact string equality).
This module runs verifiers (:func:`run_verifier`: failures and timeouts score 0 and are counted) and resolves
``model.verifier`` (:func:`resolve_verifier`). docs/verifiers.md describes every verifier and the sandbox.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Sequence

from forklight.rewards.choice import ChoiceVerifier, extract_choice
from forklight.rewards.code import CodeVerifier, code_block_format, extract_code
from forklight.rewards.code_tests import read_tests
from forklight.rewards.format import OverlongPenalty, boxed_format, final_answer, think_format
from forklight.rewards.math import MathVerifier, exact_integer, extract_last_integer, gold_as_math
from forklight.rewards.sandbox import Sandbox, SandboxJob, SandboxLimits, SandboxResult, SandboxUnavailable

__all__ = [
    "ANSWER_EXTRACTORS", "VERIFIERS", "ChoiceVerifier", "CodeVerifier", "MathVerifier", "OverlongPenalty", "Sandbox",
    "SandboxJob", "SandboxLimits", "SandboxResult", "SandboxUnavailable", "WeightedVerifiers", "boxed_format",
    "code_block_format", "exact_integer", "extract_choice", "extract_code", "extract_last_integer", "final_answer",
    "gold_answer_parser", "gold_as_math", "read_tests", "resolve_callable", "resolve_verifier", "run_verifier",
    "score_batch", "think_format",
]

log = logging.getLogger(__name__)
BOUNDED_FUNCTIONS = (exact_integer, think_format, boxed_format, code_block_format)  # forklight's, cannot hang


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
    """Whether a verifier cannot hang: forklight's own (math and code bound themselves with their own timeouts)."""
    return any(verifier is function for function in BOUNDED_FUNCTIONS) or bool(getattr(verifier, "handles_timeouts", False))


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
    (not checked) and for verifiers that need no gold answer (``uses_gold_answers = False``: ``code``, whose
    tests are the gold). ``extract_gold`` (``math``: gold answers are bare LaTeX) wins over ``extract_answer``."""
    first = verifier.verifiers[0] if isinstance(verifier, WeightedVerifiers) else verifier
    if getattr(first, "uses_gold_answers", True) is False:
        return None
    if hasattr(first, "extract_gold"):
        return first.extract_gold
    if first is exact_integer or hasattr(first, "extract_answer"):
        return extract_answer
    return None


VERIFIERS: dict[str, Callable] = {
    "exact_integer": exact_integer, "math": MathVerifier, "choice": ChoiceVerifier, "code": CodeVerifier,
    "think_format": think_format, "boxed_format": boxed_format, "code_block_format": code_block_format,
    "overlong_penalty": OverlongPenalty,
}
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
        found = resolve_callable(spec, VERIFIERS, key)
        if not isinstance(found, type):
            return found, 1.0
        try:
            return found(), 1.0
        except TypeError as error:  # a class with required options (overlong_penalty)
            raise ValueError(f"{key}={spec!r} needs options: give {{class_path: {spec}, init_args: {{...}}}} "
                             f"({error})") from error
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
    """(verifier, answer extractor) for ``model.verifier``: a name (:data:`VERIFIERS`),
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
