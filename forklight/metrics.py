"""Evaluation metrics: pass@k, majority votes (cons@N, cons@k, maj@k), and diversity across forking tokens."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable, Hashable, Sequence
from itertools import combinations
from typing import TypeVar

T = TypeVar("T")


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    The probability that at least one of k samples drawn without replacement
    from n samples (c of them correct) is correct. Computed in the numerically
    stable product form ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.

    Raises:
        ValueError: if k < 1, k > n, or c is outside [0, n].
    """
    n, c = num_samples, num_correct
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of samples n={n}")
    if c < 0 or c > n:
        raise ValueError(f"num_correct={c} must be between 0 and num_samples={n}")
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    probability_all_wrong = 1.0
    for i in range(n - c + 1, n + 1):
        probability_all_wrong *= 1.0 - k / i
    return 1.0 - probability_all_wrong


def interleave_tags(samples_by_tag: Sequence[Sequence[T]]) -> list[T]:
    """[N][n_t] -> [sum n_t] in tag-interleaved order: tag 1 sample 1, tag 2 sample 1, ..., tag 1 sample 2, ...;
    a tag with fewer samples drops out of the later rounds."""
    rounds = max((len(row) for row in samples_by_tag), default=0)
    return [row[sample] for sample in range(rounds) for row in samples_by_tag if sample < len(row)]


def deinterleave_tags(values: Sequence[T], counts: Sequence[int]) -> list[list[T]]:
    """The inverse of :func:`interleave_tags`: [sum n_t] in interleaved order -> [N][n_t], ``counts`` = n_t."""
    rows: list[list[T]] = [[] for _ in counts]
    position = 0
    for sample in range(max(counts, default=0)):
        for tag, count in enumerate(counts):
            if sample < count:
                rows[tag].append(values[position])
                position += 1
    return rows


def answer_groups(
    answers: Sequence[str | None], same_answer: Callable[[str, str], bool] = operator.eq
) -> list[int | None]:
    """Group id of each answer, [S] in voting order, so that votes count equal answers together.

    An answer joins the first earlier group whose first member it equals
    (``same_answer(first_member, answer)``, e.g. the verifier's ``1/2 = \\frac12 = 0.5``), else
    opens the next group (ids 0, 1, ... in order of first appearance). None (no answer) stays None.
    """
    representatives: list[str] = []  # first member of each group
    groups: list[int | None] = []
    for answer in answers:
        if answer is None:
            groups.append(None)
            continue
        group = next((index for index, first in enumerate(representatives)
                      if first == answer or same_answer(first, answer)), None)
        if group is None:
            group = len(representatives)
            representatives.append(answer)
        groups.append(group)
    return groups


def majority_vote(groups: Sequence[Hashable | None]) -> int | None:
    """Position of the vote's winner: the first member of the most common group.

    ``groups``: one group id (or answer) per sample, in voting order. None (no answer) does not
    vote. Ties go to the group whose first member came earliest. None if nobody voted.
    """
    counts = Counter(group for group in groups if group is not None)
    if not counts:
        return None
    winner = max(counts, key=lambda group: counts[group])  # Counter keeps first-appearance order; max takes the first
    return list(groups).index(winner)


def vote_score(groups: Sequence[Hashable | None], scores: Sequence[float | None]) -> float:
    """1.0 if the vote's winner (the winning group's first member) was scored correct (> 0.5), else 0.0.

    ``groups`` and ``scores`` [S], in voting order. The verifier's score of that sample decides,
    not a comparison with a gold string. No vote, or an unscored winner, counts as wrong.
    """
    winner = majority_vote(groups)
    if winner is None or scores[winner] is None:
        return 0.0
    return 1.0 if scores[winner] > 0.5 else 0.0


def cons_at_k(groups: Sequence[Hashable | None], scores: Sequence[float | None], k: int) -> float:
    """Consensus@k: :func:`vote_score` of a majority over the first k samples.

    ``groups``/``scores`` [S] must already be in voting order: tag-interleaved
    (:func:`interleave_tags`) for cons@k, one tag's samples for maj@k.

    Raises:
        ValueError: if k < 1 or there are fewer than k samples.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(groups) < k:
        raise ValueError(f"cons@{k} needs at least {k} samples, got {len(groups)}")
    return vote_score(groups[:k], scores[:k])


maj_at_k = cons_at_k
"""Majority@k: the same vote as :func:`cons_at_k`, over k samples of one policy (one tag)."""


def native_cons_at_n(groups: Sequence[Sequence[Hashable | None]], scores: Sequence[Sequence[float | None]]) -> float:
    """Native cons@N (DESIGN.md §2): round r votes over sample r of every tag; mean over rounds.

    ``groups``/``scores`` [N][n_t]. Each round's N answers vote in tag order (ties: the lowest tag's
    group). Only complete rounds (one sample of every tag) count: min_t n_t of them. Returns 0.0 when
    there are none.
    """
    rounds = min((len(row) for row in groups), default=0)
    if rounds == 0:
        return 0.0
    return sum(vote_score([row[r] for row in groups], [row[r] for row in scores]) for r in range(rounds)) / rounds


def _character_trigrams(text: str) -> set[str]:
    """Set of character 3-grams; a non-empty text shorter than 3 is its own gram."""
    if 0 < len(text) < 3:
        return {text}
    return {text[start : start + 3] for start in range(len(text) - 2)}


def _jaccard_similarity(first: set[str], second: set[str]) -> float:
    """|A & B| / |A | B|; two empty sets count as identical (similarity 1)."""
    union = first | second
    if not union:
        return 1.0
    return len(first & second) / len(union)


def distinctness(texts_by_tag: Sequence[Sequence[str]]) -> float:
    """How different the outputs of different forking tokens are, in [0, 1].

    ``texts_by_tag[i]`` holds tag i's sampled outputs for one question. Each
    tag's samples are concatenated; the result is the mean over tag pairs
    (i < j) of ``1 - jaccard(trigrams_i, trigrams_j)`` on character 3-grams.
    0 means identical outputs, 1 means no shared 3-gram. Returns 0.0 when
    there are fewer than 2 tags.
    """
    trigram_sets = [_character_trigrams("\n".join(texts)) for texts in texts_by_tag]
    pairs = list(combinations(trigram_sets, 2))
    if not pairs:
        return 0.0
    return sum(1.0 - _jaccard_similarity(first, second) for first, second in pairs) / len(pairs)


def strategy_purity(labels: Sequence[str | None]) -> float:
    """Share of labels equal to the most common non-None label, in [0, 1].

    Used to measure whether one forking token sticks to one strategy. None
    labels (unclassified) count as impure. Returns 0.0 for an empty sequence.
    """
    if not labels:
        return 0.0
    counts = Counter(label for label in labels if label is not None)
    if not counts:
        return 0.0
    return max(counts.values()) / len(labels)
