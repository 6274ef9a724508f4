"""Shaping rewards to add to a correctness verifier with weights (``model.verifier: [..., {function, weight}]``).

- ``think_format``: 1.0 when the reasoning is closed by ``</think>`` before an answer (TRL's ``think_format_reward``
  without its requirement that the completion open with ``<think>``: chat templates often put that in the prompt);
- ``boxed_format``: 1.0 when the answer holds a ``\\boxed{...}`` with balanced braces and something inside;
- ``overlong_penalty``: DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13; TRL's
  ``get_soft_overlong_punishment``, verl's ``overlong_buffer``): with ``L = max_length`` and ``B = buffer``,
  ``0`` up to ``L - B``, then ``((L - B) - |y|) / B`` (falling linearly to -1 at ``L``), and ``-1`` past ``L``;
  multiplied by ``penalty``.

They score every completion (no gold answer needed) and never return None.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

THINK_END = "</think>"


def final_answer(text: str) -> str:
    """The answer part of a completion: what follows the last ``</think>`` (all of it when there is none)."""
    return text.rsplit(THINK_END, 1)[-1]


def think_format(completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
    """1.0 when exactly one ``</think>`` closes the reasoning, no ``<think>`` reopens it, and an answer follows."""
    scores: list[float | None] = []
    for text in completions:
        head, closed, tail = text.partition(THINK_END)
        well_formed = bool(closed) and THINK_END not in tail and "<think>" not in tail and head.count("<think>") <= 1
        scores.append(1.0 if well_formed and tail.strip() else 0.0)
    return scores


_BOXED = re.compile(r"\\boxed\s*\{")


def has_boxed_answer(text: str) -> bool:
    """Whether ``text`` holds a ``\\boxed{...}`` whose braces balance and which is not empty."""
    for match in _BOXED.finditer(text):
        depth, start = 1, match.end()
        for position in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[position], 0)
            if depth == 0:
                if text[start:position].strip():
                    return True
                break
    return False


def boxed_format(completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
    """1.0 when the answer (after ``</think>``, if any) holds a non-empty, balanced ``\\boxed{...}``."""
    return [1.0 if has_boxed_answer(final_answer(text)) else 0.0 for text in completions]


def overlong_penalty_value(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment (Eq. 13) of a completion of ``length``: 0, then linear to -1, then -1."""
    if length <= max_length - buffer:
        return 0.0
    if length <= max_length:
        return ((max_length - buffer) - length) / buffer
    return -1.0


class OverlongPenalty:
    """DAPO's soft overlong punishment as a reward term (add it to a correctness verifier with a weight).

    Lengths are counted in the tokens of ``tokenizer`` (a name or path, ``toy`` for the character tokenizer)
    or, without one, in characters.
    """

    handles_timeouts = True  # a length per completion: nothing to bound

    def __init__(self, max_length: int, buffer: int, penalty: float = 1.0, tokenizer: str | None = None) -> None:
        """
        Args:
            max_length: L_max, the length past which the penalty is ``-penalty`` (usually the rollouts'
                ``max_completion_tokens``).
            buffer: L_cache, the soft zone before ``max_length`` where the penalty grows linearly from 0.
            penalty: the penalty's scale (verl's ``overlong_penalty_factor``).
            tokenizer: counts tokens with it (the policy's tokenizer); null counts characters.
        """
        if not 0 < buffer <= max_length:
            raise ValueError(f"overlong_penalty: need 0 < buffer <= max_length, got buffer={buffer}, "
                             f"max_length={max_length}")
        self.max_length, self.buffer, self.penalty = max_length, buffer, penalty
        self.tokenizer_name = tokenizer
        self._tokenizer = None

    def length(self, text: str) -> int:
        if self.tokenizer_name is None:
            return len(text)
        if self._tokenizer is None:
            from forklight.data.rendering import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_name)
        return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def __call__(self, completions: Sequence[str], answers: Sequence[str | None], **columns) -> list[float | None]:
        return [self.penalty * overlong_penalty_value(self.length(text), self.max_length, self.buffer)
                for text in completions]
