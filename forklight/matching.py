"""Assign a question's sampled traces to forking tokens (tags).

Each question has M reasoning traces and the model has N forking tokens
(N >= M). ``cost[i, j]`` is the loss of trace j when conditioned on tag i.
A matching gives every trace one tag, never two traces the same tag
(except in the ``single`` baseline, where every trace uses tag 0).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

MATCHING_MODES = ("hungarian", "random", "fixed", "single")


def match_traces_to_tags(
    cost: np.ndarray, mode: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Return the tag index chosen for each trace, as an int64 array [M].

    Args:
        cost: [N, M] float matrix; ``cost[i, j]`` is the loss of trace j under tag i.
        mode: one of ``MATCHING_MODES``:
            - ``hungarian``: minimise total cost over injective trace -> tag maps.
            - ``random``: a uniformly random injective map (needs ``rng``).
            - ``fixed``: trace j -> tag j.
            - ``single``: every trace -> tag 0 (no forking baseline).
        rng: random generator, required for ``random``.

    Raises:
        ValueError: unknown mode, more traces than tags (except ``single``),
            missing ``rng`` for ``random``, or non-finite costs for ``hungarian``.
    """
    if mode not in MATCHING_MODES:
        raise ValueError(f"Unknown matching mode {mode!r}; allowed modes: {', '.join(MATCHING_MODES)}")
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-D [num_tags, num_traces] matrix, got shape {cost.shape}")
    num_tags, num_traces = cost.shape

    if mode == "single":
        return np.zeros(num_traces, dtype=np.int64)  # [M]

    if num_traces > num_tags:
        raise ValueError(
            f"Matching mode {mode!r} got {num_traces} traces but only {num_tags} forking tokens; "
            "raise model.init_args.num_fork_tokens, or set data.init_args.max_traces to at most that many"
        )

    if mode == "fixed":
        return np.arange(num_traces, dtype=np.int64)  # [M]

    if mode == "random":
        if rng is None:
            raise ValueError("Matching mode 'random' requires an rng (np.random.Generator)")
        return rng.permutation(num_tags)[:num_traces].astype(np.int64)  # [M]

    # hungarian
    if not np.all(np.isfinite(cost)):
        raise ValueError("Hungarian matching needs finite costs, but cost contains NaN or inf")
    # Transpose to [M, N] so rows are traces: every trace gets exactly one tag.
    trace_indices, tag_indices = linear_sum_assignment(cost.T)
    assignment = np.empty(num_traces, dtype=np.int64)  # [M]
    assignment[trace_indices] = tag_indices
    return assignment


def assignment_cost(cost: np.ndarray, assignment: np.ndarray) -> float:
    """Total cost of an assignment: sum over traces j of ``cost[assignment[j], j]``.

    Args:
        cost: [N, M] float matrix.
        assignment: [M] int tag index per trace.
    """
    cost = np.asarray(cost, dtype=np.float64)
    trace_indices = np.arange(cost.shape[1])  # [M]
    return float(cost[np.asarray(assignment), trace_indices].sum())


def expected_random_cost(cost: np.ndarray) -> float:
    """Exact expected total cost of a uniformly random injective assignment.

    Equals ``sum_j mean_i cost[i, j]``. Why: in a uniformly random injective
    map (a random permutation of the N tags, truncated to M), each single
    trace j lands on every tag with the same probability 1/N. By linearity
    of expectation the expected total is the sum of per-trace expectations,
    and the dependence between traces (no shared tags) does not matter.

    The "match cost gap" logged during training is
    ``expected_random_cost(cost) - assignment_cost(cost, matched)``.

    Args:
        cost: [N, M] float matrix.
    """
    cost = np.asarray(cost, dtype=np.float64)
    return float(cost.mean(axis=0).sum())  # mean over tags [M], then sum over traces
