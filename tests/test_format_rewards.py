"""Shaping rewards: a closed ``</think>`` before the answer, a boxed answer, DAPO's soft overlong penalty (by hand), and
their weighted sum with a correctness verifier through ``model.verifier``."""

from __future__ import annotations

import pytest

from forklight.rewards import OverlongPenalty, boxed_format, resolve_verifier, think_format
from forklight.rewards.format import overlong_penalty_value


@pytest.mark.parametrize("text, score", [
    ("<think>2+2 is 4</think>The answer is 4.", 1.0),
    ("2+2 is 4</think>\nThe answer is 4.", 1.0),  # the template opened <think> in the prompt
    ("<think>2+2 is 4 and the answer is 4.", 0.0),  # never closed
    ("<think>2+2 is 4</think>   \n", 0.0),  # nothing after it
    ("<think>a</think>b</think>c", 0.0),  # closed twice
    ("<think>a</think>b<think>c", 0.0),  # reopened in the answer
    ("The answer is 4.", 0.0),
])
def test_think_format_needs_one_closing_tag_before_an_answer(text, score):
    assert think_format([text], [None]) == [score]


@pytest.mark.parametrize("text, score", [
    ("so \\boxed{\\frac{1}{2}}", 1.0),
    ("<think>\\boxed{3}</think>The answer is 3.", 0.0),  # boxed only while thinking
    ("\\boxed{}", 0.0), ("\\boxed{ 3", 0.0), ("the answer is 3", 0.0),
    ("\\boxed {x^{2}}", 1.0),
])
def test_boxed_format_needs_a_balanced_nonempty_box_in_the_answer(text, score):
    assert boxed_format([text], [None]) == [score]


def test_overlong_penalty_is_dapos_soft_punishment():
    # Eq. 13 of DAPO with L_max = 20, L_cache = 8: 0 up to 12, linear to -1 at 20, -1 beyond
    assert [overlong_penalty_value(n, 20, 8) for n in (0, 12, 13, 16, 20, 21, 100)] == [0.0, 0.0, -0.125, -0.5, -1.0, -1.0, -1.0]
    penalty = OverlongPenalty(max_length=20, buffer=8, penalty=0.5)
    assert penalty(["x" * 12, "x" * 16, "x" * 30], [None] * 3) == [0.0, -0.25, -0.5]
    assert OverlongPenalty(max_length=4, buffer=2, tokenizer="toy")(["12345"], [None]) == [-1.0]  # 5 toy tokens
    with pytest.raises(ValueError, match="0 < buffer <= max_length"):
        OverlongPenalty(max_length=4, buffer=8)


def test_shaping_terms_add_to_correctness_with_weights():
    verifier, extract = resolve_verifier([
        "exact_integer", {"function": "think_format", "weight": 0.1}, {"function": "boxed_format", "weight": 0.1},
        {"class_path": "overlong_penalty", "init_args": {"max_length": 40, "buffer": 10}, "weight": 1.0}])
    texts = ["<think>1+1</think>\\boxed{2}", "\\boxed{3}", "<think>" + "1" * 40 + "</think> 2"]
    assert verifier(texts, ["2", "2", "2"]) == pytest.approx([1.2, 0.1, 1.1 - 1.0])
    assert extract("\\boxed{7}") == "7"  # majority votes read the first verifier's answers
    with pytest.raises(ValueError, match="needs options"):
        resolve_verifier("overlong_penalty")
