"""Verifiers: score completions against gold answers (1.0 correct, 0.0 wrong, None = skip).

A verifier is ``f(completions, answers, **columns) -> list[float | None]``, named here
(``exact_integer``) or given as ``module:function``. ``extract_answer`` gives the answer string
that majority voting (cons@N) compares.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence

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


VERIFIERS: dict[str, Callable] = {"exact_integer": exact_integer}
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


def resolve_verifier(spec: str) -> tuple[Callable, Callable[[str], str | None]]:
    """(verifier, answer extractor) for ``model.verifier``; user verifiers vote on the last integer
    unless the function has an ``extract_answer`` attribute."""
    verifier = resolve_callable(spec, VERIFIERS, "model.verifier")
    extractor = ANSWER_EXTRACTORS.get(spec) or getattr(verifier, "extract_answer", extract_last_integer)
    return verifier, extractor
