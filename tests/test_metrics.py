"""Tests for forklight.metrics."""

from itertools import combinations
from math import comb

import pytest

from forklight.metrics import (
    cons_at_k,
    distinctness,
    maj_at_k,
    majority_vote,
    pass_at_k,
    strategy_purity,
)


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - comb(3, 2) / comb(5, 2))
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(4, 4, 4) == 1.0


@pytest.mark.parametrize("n", [1, 3, 6, 8])
def test_pass_at_k_matches_brute_force(n):
    for c in range(n + 1):
        correct = [index < c for index in range(n)]
        for k in range(1, n + 1):
            subsets = list(combinations(correct, k))
            brute_force = sum(any(subset) for subset in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute_force)


def test_pass_at_k_errors():
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_majority_vote():
    assert majority_vote(["a", "b", "b"]) == "b"
    assert majority_vote(["b", "a", "a", "b"]) == "b"  # tie -> first appearance
    assert majority_vote([None, "a", "b"]) == "a"
    assert majority_vote([None, None, "c", None]) == "c"
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_cons_at_k():
    answers = ["1", "1", "2", "2", "2", "1", "3"]
    # groups of 3: ["1","1","2"] -> "1"; ["2","2","1"] -> "2"; "3" dropped
    assert cons_at_k(answers, "1", 3) == pytest.approx(0.5)
    assert cons_at_k(answers, "2", 3) == pytest.approx(0.5)
    assert cons_at_k(answers, "1", 1) == pytest.approx(3 / 7)
    assert cons_at_k(answers, "1", 7) == 1.0  # "1" and "2" tie at 3; "1" came first
    assert cons_at_k([None, None], "1", 2) == 0.0
    assert maj_at_k is cons_at_k
    with pytest.raises(ValueError):
        cons_at_k(["1"], "1", 2)


def test_distinctness():
    assert distinctness([["the answer is 4"], ["the answer is 4"]]) == 0.0
    assert distinctness([["aaaa"], ["bbbb"], ["cccc"]]) == 1.0
    assert distinctness([["only one tag"]]) == 0.0
    assert distinctness([]) == 0.0
    partial = distinctness([["abcd"], ["abce"]])  # {abc,bcd} vs {abc,bce}
    assert partial == pytest.approx(1 - 1 / 3)
    assert 0.0 <= distinctness([["x y z"], ["x y w", "q"], [""]]) <= 1.0


def test_strategy_purity():
    assert strategy_purity(["algebra", "algebra", "casework", None]) == pytest.approx(0.5)
    assert strategy_purity(["a", "a", "a"]) == 1.0
    assert strategy_purity([None, None]) == 0.0
    assert strategy_purity([]) == 0.0
