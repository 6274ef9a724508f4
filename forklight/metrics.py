"""Evaluation metrics: pass@k, consensus@k, and diversity across forking tokens."""

from __future__ import annotations

from collections import Counter
from itertools import combinations
from typing import Sequence


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


def majority_vote(answers: Sequence[str | None]) -> str | None:
    """Most common non-None answer; ties go to the answer that appeared first.

    Returns None if there is no non-None answer.
    """
    counts = Counter(answer for answer in answers if answer is not None)
    if not counts:
        return None
    # Counter keeps first-insertion order and max() returns the first maximum.
    return max(counts, key=lambda answer: counts[answer])


def cons_at_k(answers: Sequence[str | None], gold: str, k: int) -> float:
    """Consensus@k: share of groups of k answers whose majority vote equals ``gold``.

    ``answers`` must already be in voting order (the caller interleaves tags so
    each group mixes forking tokens). They are split into ``len(answers) // k``
    consecutive groups of k; an incomplete last group is dropped.

    Raises:
        ValueError: if k < 1 or there are fewer than k answers.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if len(answers) < k:
        raise ValueError(f"cons@{k} needs at least {k} answers, got {len(answers)}")
    num_groups = len(answers) // k
    groups = [answers[start * k : (start + 1) * k] for start in range(num_groups)]
    return sum(majority_vote(group) == gold for group in groups) / num_groups


maj_at_k = cons_at_k
"""Majority@k: another name for :func:`cons_at_k` (same definition)."""


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
