"""The ``choice`` verifier: multiple-choice letters (A-D, up to A-J).

Options are shuffled per question by the benchmark loader (:func:`forklight.data.benchmarks.shuffled_options`, GPQA),
so the gold answer is the correct option's letter; this module only reads letters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from forklight.rewards.format import final_answer

_LETTER_END = r"(?=\s*$|\s*[.,;:!?*$)\]}]|\s+[-–—]|\s*\n)"  # a bare letter ends the answer: "C.", "C)", "C\n"
_CHOICE_PATTERNS = [  # most explicit first; within a pattern the last match wins
    # \boxed{C}, \boxed{(C)}, \boxed{\text{C}}, \boxed{\textbf{(C)}}, \boxed{C) Nitrogen}
    re.compile(r"\\boxed\{\s*(?:\\(?:text|textbf|mathrm|mathbf)\{\s*)?\(?([A-J])(?![A-Za-z])"),
    # Answer: C / the answer is (C) / Final answer: **C** / answer is $C$ / correct answer is option C
    re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*(?:\*\*|\$|\\\()?\s*(?i:option\s+|choice\s+)?"
               r"(?:\(([A-J])\)|([A-J])" + _LETTER_END + ")"),
    re.compile(r"\*\*\s*\(?([A-J])(?:\)|\*\*|[.:]\s)"),  # **C**, **(C)**, **C) Nitrogen**, **C. Nitrogen**
    re.compile(r"(?m)^\s*\(?([A-J])\)?[.)]?\s*$"),  # a line that is only the letter
]


def extract_choice(text: str, letters: str = "ABCDEFGHIJ") -> str | None:
    """The chosen option letter of a multiple-choice completion, or None: ``\\boxed{C}``, then "Answer: C" / "the
    answer is (C)", then "**C**", then a line holding only the letter; the last match of the first pattern that
    matches (text after ``</think>`` when there is one). A bare letter after "answer is" must end the answer
    ("C.", "C)", end of line): "the answer is I think" reads no "I". Letters outside ``letters`` are ignored."""
    tail = final_answer(text)
    for pattern in _CHOICE_PATTERNS:
        found = [letter for match in pattern.findall(tail)
                 for letter in ([match] if isinstance(match, str) else match) if letter and letter in letters]
        if found:
            return found[-1]
    return None


class ChoiceVerifier:
    """Multiple choice (A-D, up to A-J): 1.0 when the extracted letter (:func:`extract_choice`) is the gold letter,
    0.0 otherwise (no letter found included); a gold answer that is not a single letter gives None (skipped)."""

    handles_timeouts = True  # regular expressions on one completion: nothing to bound

    def __init__(self, letters: str = "ABCDEFGHIJ") -> None:
        """
        Args:
            letters: the option letters a completion may choose (``ABCD`` for four options).
        """
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
