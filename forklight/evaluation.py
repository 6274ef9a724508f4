"""Evaluation aggregation (DESIGN.md §2): per-question samples to per-tag and overall metrics.

Pure and Lightning-free; :class:`forklight.modules.evaluating.Evaluator` samples the completions,
regroups them with :func:`question_evaluations` (or :func:`prediction_rows` for ``forklight
predict``) and calls :func:`evaluation_metrics` with the module's settings.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from forklight.metrics import (
    answer_groups,
    cons_at_k,
    distinctness,
    interleave_tags,
    maj_at_k,
    native_cons_at_n,
    pass_at_k,
    strategy_purity,
)


@dataclass
class QuestionEvaluation:
    """Evaluation samples of one question: ``n_per_tag`` per tag, indexed [tag][sample]."""

    id: str
    answer: str | None
    scores: list[list[float | None]]  # [N][n] verifier scores (None = not scorable)
    answers: list[list[str | None]]  # [N][n] extracted answers (None: none found), for majority voting
    lengths: list[list[int]]  # [N][n] generated tokens
    texts: list[list[str]]  # [N][n]
    strategies: list[list[str | None]] = field(default_factory=list)  # [N][n] if a classifier is set
    policy: list[float] = field(default_factory=list)  # [N] the model's tag distribution pi(i | x)


def every_tag(num_tags: int, n_per_tag: int) -> list[int]:
    """The tags of one question's evaluation samples, ``n_per_tag`` after each tag: [N * n], ordered [tag, sample]."""
    return [tag for tag in range(num_tags) for _ in range(n_per_tag)]


def question_evaluations(
    ids: Sequence[str],
    gold: Sequence[str | None],
    texts: Sequence[str],
    lengths: Sequence[int],
    scores: Sequence[float | None],
    policy: Sequence[list[float]],
    num_tags: int,
    n_per_tag: int,
    extract_answer: Callable[[str], str | None],
    classify_strategy: Callable[[str], str | None] | None = None,
) -> list[QuestionEvaluation]:
    """Flat samples [B * N * n], ordered [question, tag, sample] (:func:`every_tag` per question),
    regrouped per question as [tag][sample]; ``policy`` [B][N] is each question's tag distribution."""
    n, per_question = n_per_tag, num_tags * n_per_tag

    def grid(values: Iterable) -> list[list]:  # flat [N * n] -> [N][n]
        values = list(values)
        return [values[t * n : (t + 1) * n] for t in range(num_tags)]

    results = []
    for q, question_id in enumerate(ids):
        block = slice(q * per_question, (q + 1) * per_question)
        results.append(
            QuestionEvaluation(
                id=question_id,
                answer=gold[q],
                scores=grid(scores[block]),
                answers=grid(extract_answer(text) for text in texts[block]),
                lengths=grid(lengths[block]),
                texts=grid(texts[block]),
                strategies=grid(classify_strategy(text) for text in texts[block]) if classify_strategy else [],
                policy=policy[q],
            )
        )
    return results


def prediction_rows(
    ids: Sequence[str],
    gold: Sequence[str | None],
    tags: Sequence[Sequence[int]],
    texts: Sequence[str],
    lengths: Sequence[int],
    scores: Sequence[float | None],
    policy: Sequence[list[float]],
    tag_names: Sequence[str],
    extract_answer: Callable[[str], str | None],
    chosen_by: str,
    default_tag: int,
    n_per_tag: int,
) -> list[dict]:
    """One ``forklight predict`` row per sample (flat [sum of len(tags[q])], ordered [question, sample]).

    ``chosen_by``: ``all`` (``tags[q]`` is :func:`every_tag`; samples numbered per tag) or the fork
    policy that chose ``tags[q]`` (samples numbered per question).
    """
    rows, position = [], 0
    for q, question_id in enumerate(ids):
        for sample, tag in enumerate(tags[q]):
            text, score = texts[position], scores[position]
            rows.append({
                "id": question_id, "tag": tag_names[tag], "tag_index": tag, "tag_prob": policy[q][tag],
                "chosen_by": chosen_by, "sample": sample % n_per_tag if chosen_by == "all" else sample,
                "completion": text, "answer": extract_answer(text), "gold": gold[q], "score": score,
                "length": lengths[position], "default_tag": tag == default_tag,
            })
            position += 1
    return rows


def unique_questions(evaluations: Iterable[QuestionEvaluation]) -> list[QuestionEvaluation]:
    """Each question's first evaluation, in order (ranks' distributed samplers may pad with repeats)."""
    seen, unique = set(), []
    for evaluation in evaluations:
        if evaluation.id not in seen:
            seen.add(evaluation.id)
            unique.append(evaluation)
    return unique


def choose_tags(policy: np.ndarray, fork_policy: str, samples: int, rng: np.random.Generator,
                policy_tags: dict[str, int]) -> np.ndarray:
    """The tag of each of ``samples`` single-shot answers per question, [B, samples].

    ``policy`` [B, N]: the model's tag distribution per question. ``learned`` samples from it,
    ``argmax`` takes its mode, ``uniform`` draws uniformly, ``coverage``/``fixed`` use ``policy_tags``.
    """
    num_questions, num_tags = policy.shape
    if fork_policy == "learned":
        cumulative = np.cumsum(policy / policy.sum(axis=1, keepdims=True), axis=1)  # [B, N]
        draws = rng.random((num_questions, samples, 1))  # [B, S, 1]
        return np.minimum((draws > cumulative[:, None, :]).sum(axis=2), num_tags - 1)
    if fork_policy == "argmax":
        return np.repeat(policy.argmax(axis=1)[:, None], samples, axis=1)
    if fork_policy == "uniform":
        return rng.integers(0, num_tags, size=(num_questions, samples))
    return np.full((num_questions, samples), policy_tags[fork_policy])


def used_tags(coverage: list[float]) -> list[int]:
    """Tags with at least half a uniform share of the training traces (all tags before training)."""
    total = sum(coverage)
    if total == 0:
        return list(range(len(coverage)))
    return [tag for tag, count in enumerate(coverage) if count / total >= 0.5 / len(coverage)]


def evaluation_metrics(
    evaluations: list[QuestionEvaluation],
    num_tags: int,
    n_per_tag: int,
    k: int,
    same_answer: Callable[[str, str], bool] | None,
    policy_tags: dict[str, int],
    fork_policy: str,
    purity_tags: list[int] | None = None,
) -> dict[str, float]:
    """Per-tag pass@1/len/maj@n(/purity), pass@k, cons@N, cons@k, single-shot pass@1 per policy, distinctness.

    Majority votes (DESIGN.md §2) count answers that ``same_answer`` (the verifier's
    equivalence; None: exact string equality) says are equal as one group; None answers do not
    vote; a vote is correct when the winning group's first member was scored correct; ties go to
    the group whose first member came earliest in tag-interleaved order (tag 1 sample 1, tag 2
    sample 1, ..., tag 1 sample 2, ...). ``cons@N`` (native): round r votes over sample r of every
    tag, averaged over rounds and questions. ``cons@{k}``: one vote over the first k samples in
    interleaved order (only when there are at least k). ``tag{i}/maj@{n}`` (when n > 1): one vote
    over tag i's n samples. Questions without any score (no gold answer) do not vote.

    ``policy_tags`` maps the tag-picking policies (``coverage``, ``fixed``) to their tag;
    ``uniform`` and ``best_tag`` are computed from all tags; ``learned`` (expected pass@1 of a tag
    drawn from the model's own tag distribution) and ``argmax`` (its most likely tag) per question. ``purity_tags`` (the tags trained on)
    enables purity, averaged over them; leave it None when there is no strategy classifier.
    """
    n = n_per_tag
    metrics: dict[str, float] = {}
    tag_pass = []
    for tag in range(num_tags):
        scored = [s for e in evaluations for s in e.scores[tag] if s is not None]
        tag_pass.append(float(np.mean(scored)) if scored else 0.0)
        metrics[f"tag{tag + 1}/pass@1"] = tag_pass[-1]
        metrics[f"tag{tag + 1}/len"] = float(np.mean([length for e in evaluations for length in e.lengths[tag]]))
    pass_k, cons_n, cons_k = [], [], []
    maj: list[list[float]] = [[] for _ in range(num_tags)]  # [N][questions]
    for e in evaluations:
        flat = [s for row in e.scores for s in row if s is not None]
        if flat and len(flat) >= k:
            pass_k.append(pass_at_k(len(flat), int(sum(s > 0.5 for s in flat)), k))
        if not flat:
            continue  # nothing scored (no gold answer): no vote
        interleaved = answer_groups(interleave_tags(e.answers), same_answer or operator.eq)  # [N*n]
        groups = [interleaved[tag::num_tags] for tag in range(num_tags)]  # [N][n], ids shared across tags
        cons_n.append(native_cons_at_n(groups, e.scores))
        if len(interleaved) >= k:
            cons_k.append(cons_at_k(interleaved, interleave_tags(e.scores), k))
        for tag in range(num_tags):
            maj[tag].append(maj_at_k(groups[tag], e.scores[tag], n))
    metrics["pass@k"] = float(np.mean(pass_k)) if pass_k else 0.0
    metrics["cons@N"] = float(np.mean(cons_n)) if cons_n else 0.0
    if cons_k:
        metrics[f"cons@{k}"] = float(np.mean(cons_k))
    if n > 1 and cons_n:
        for tag in range(num_tags):
            metrics[f"tag{tag + 1}/maj@{n}"] = float(np.mean(maj[tag]))
    for policy, tag in policy_tags.items():
        metrics[f"pass@1/{policy}"] = tag_pass[tag]
    metrics["pass@1/uniform"] = float(np.mean(tag_pass))
    if evaluations and all(e.policy for e in evaluations):
        learned, argmax = [], []
        for e in evaluations:
            per_tag = [float(np.mean([s for s in row if s is not None] or [0.0])) for row in e.scores]  # [N]
            learned.append(float(np.dot(e.policy, per_tag)))  # expected pass@1 of a tag drawn from pi(. | x)
            argmax.append(per_tag[int(np.argmax(e.policy))])
        metrics["pass@1/learned"] = float(np.mean(learned))
        metrics["pass@1/argmax"] = float(np.mean(argmax))
    metrics["pass@1/best_tag"] = max(tag_pass)
    if f"pass@1/{fork_policy}" not in metrics:
        raise ValueError(f"fork_policy={fork_policy} needs the model's tag distribution for every question "
                         "(QuestionEvaluation.policy); use coverage, fixed or uniform")
    metrics["pass@1"] = metrics[f"pass@1/{fork_policy}"]
    metrics["len"] = float(np.mean([length for e in evaluations for row in e.lengths for length in row]))
    metrics["distinctness"] = float(np.mean([distinctness(e.texts) for e in evaluations]))
    if purity_tags is not None:
        for tag in range(num_tags):
            labels = [label for e in evaluations for label in e.strategies[tag]]
            metrics[f"tag{tag + 1}/purity"] = strategy_purity(labels)
        metrics["purity"] = float(np.mean([metrics[f"tag{tag + 1}/purity"] for tag in purity_tags]))
    return metrics
