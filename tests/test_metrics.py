"""Tests for forklight.metrics."""

from itertools import combinations
from math import comb

import pytest

from forklight.metrics import (
    answer_groups,
    cons_at_k,
    distinctness,
    interleave_tags,
    maj_at_k,
    majority_vote,
    native_cons_at_n,
    pass_at_k,
    strategy_purity,
    vote_score,
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


def test_majority_vote_returns_the_first_member_of_the_winning_group():
    assert majority_vote(["a", "b", "b"]) == 1
    assert majority_vote([None, "a", "b"]) == 1  # None answers do not vote
    assert majority_vote([None, None, "c", None]) == 2
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_vote_ties_go_to_the_group_that_came_first():
    assert majority_vote(["b", "a", "a", "b"]) == 0  # b and a tie at 2; b's first member came first
    assert majority_vote(["a", "b", "b", "a", "c"]) == 0
    assert majority_vote([None, "x", "y"]) == 1
    assert majority_vote([0, 1, 2]) == 0  # no majority: the earliest answer wins


def test_answer_groups_join_the_first_equal_group():
    halves = {"1/2", "\\frac{1}{2}", "0.5"}

    def same(first, second):
        return first == second or {first, second} <= halves

    assert answer_groups(["0.5", "3", None, "1/2", "\\frac{1}{2}", "3", "4"], same) == [0, 1, None, 0, 0, 1, 2]
    assert answer_groups(["2.0", "2"]) == [0, 1]  # default: exact string equality


def test_vote_score_is_the_winning_group_s_score():
    # groups [0, 1, 1]: group 1 wins; its first member (position 1) was scored correct
    assert vote_score([0, 1, 1], [0.0, 1.0, 1.0]) == 1.0
    assert vote_score([0, 1, 1], [1.0, 0.0, 0.0]) == 0.0
    assert vote_score([None, None], [0.0, 0.0]) == 0.0  # nobody voted
    assert vote_score([1, 0, 0, 1], [1.0, 0.0, 0.0, 1.0]) == 1.0  # tie: group 1 came first


def test_native_cons_at_n_votes_round_by_round():
    # N = 2 tags, n = 3 samples each; round r votes (tag1 sample r, tag2 sample r)
    groups = [[0, 0, 1],  # tag 1: correct, correct, wrong
              [0, 1, 1]]  # tag 2: correct, wrong, wrong
    scores = [[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]
    # rounds: (0, 0) -> correct; (0, 1) tie -> tag 1's answer, correct; (1, 1) -> wrong
    assert native_cons_at_n(groups, scores) == pytest.approx(2 / 3)
    # rounds: (1, 0) tie -> tag 1's wrong answer; (0, 0) correct; (0, 0) correct
    assert native_cons_at_n([[1, 0, 0], [0, 0, 0]], [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0]]) == pytest.approx(2 / 3)


def test_cons_at_k_votes_over_the_first_k_in_the_given_order():
    groups, scores = [0, 1, 1, 0, 0], [1.0, 0.0, 0.0, 1.0, 1.0]
    assert cons_at_k(groups, scores, 1) == 1.0
    assert cons_at_k(groups, scores, 3) == 0.0  # 0, 1, 1 -> group 1 (wrong)
    assert cons_at_k(groups, scores, 4) == 1.0  # tie 2-2 -> group 0 came first
    assert cons_at_k(groups, scores, 5) == 1.0
    assert maj_at_k is cons_at_k
    with pytest.raises(ValueError):
        cons_at_k(groups, scores, 6)
    with pytest.raises(ValueError):
        cons_at_k(groups, scores, 0)


def test_interleave_tags():
    assert interleave_tags([["a1", "a2"], ["b1", "b2"], ["c1", "c2"]]) == ["a1", "b1", "c1", "a2", "b2", "c2"]


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
