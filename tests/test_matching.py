"""Tests for forklight.matching: trace -> forking-token assignment."""

from itertools import permutations

import numpy as np
import pytest

from forklight.matching import (
    MATCHING_MODES,
    assignment_cost,
    expected_random_cost,
    match_traces_to_tags,
)


def all_injective_costs(cost: np.ndarray) -> list[float]:
    """Total cost of every injective trace -> tag map (brute force)."""
    num_tags, num_traces = cost.shape
    return [
        sum(cost[tag, trace] for trace, tag in enumerate(tags))
        for tags in permutations(range(num_tags), num_traces)
    ]


def test_hungarian_matches_brute_force():
    rng = np.random.default_rng(0)
    for num_tags in range(1, 7):
        for num_traces in range(1, min(num_tags, 4) + 1):
            for _ in range(20):
                cost = rng.normal(size=(num_tags, num_traces))  # [N, M]
                assignment = match_traces_to_tags(cost, "hungarian")
                assert assignment.shape == (num_traces,)
                assert assignment.dtype == np.int64
                assert len(set(assignment.tolist())) == num_traces  # injective
                assert assignment_cost(cost, assignment) == pytest.approx(
                    min(all_injective_costs(cost))
                )


def test_random_is_injective_covers_all_tags_and_is_reproducible():
    cost = np.zeros((5, 3))
    rng = np.random.default_rng(1)
    seen_tags = set()
    for _ in range(200):
        assignment = match_traces_to_tags(cost, "random", rng)
        assert len(set(assignment.tolist())) == 3
        assert all(0 <= tag < 5 for tag in assignment)
        seen_tags.update(assignment.tolist())
    assert seen_tags == set(range(5))
    first = match_traces_to_tags(cost, "random", np.random.default_rng(7))
    second = match_traces_to_tags(cost, "random", np.random.default_rng(7))
    np.testing.assert_array_equal(first, second)


def test_fixed_and_single():
    cost = np.random.default_rng(2).normal(size=(4, 3))
    np.testing.assert_array_equal(match_traces_to_tags(cost, "fixed"), [0, 1, 2])
    np.testing.assert_array_equal(match_traces_to_tags(cost, "single"), [0, 0, 0])
    # single allows more traces than tags
    np.testing.assert_array_equal(match_traces_to_tags(np.zeros((1, 3)), "single"), [0, 0, 0])


@pytest.mark.parametrize("mode", ["hungarian", "random", "fixed"])
def test_more_traces_than_tags_raises(mode):
    with pytest.raises(ValueError, match="3 traces but only 2 forking tokens"):
        match_traces_to_tags(np.zeros((2, 3)), mode, np.random.default_rng(0))


def test_other_errors():
    with pytest.raises(ValueError, match="hungarian"):
        match_traces_to_tags(np.zeros((2, 2)), "greedy")
    with pytest.raises(ValueError, match="rng"):
        match_traces_to_tags(np.zeros((2, 2)), "random")
    cost = np.zeros((3, 2))
    cost[1, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        match_traces_to_tags(cost, "hungarian")
    assert {"hungarian", "random", "fixed", "single"} <= set(MATCHING_MODES)  # the required modes; more may come


def test_assignment_cost():
    cost = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    assert assignment_cost(cost, np.array([2, 0])) == pytest.approx(5.0 + 2.0)


def test_expected_random_cost_equals_brute_force_average():
    rng = np.random.default_rng(3)
    for num_tags in range(1, 6):
        for num_traces in range(1, num_tags + 1):
            cost = rng.normal(size=(num_tags, num_traces))
            brute_force = float(np.mean(all_injective_costs(cost)))
            assert expected_random_cost(cost) == pytest.approx(brute_force)
            # The matched cost is never worse than random on average.
            matched = assignment_cost(cost, match_traces_to_tags(cost, "hungarian"))
            assert expected_random_cost(cost) - matched >= -1e-12
