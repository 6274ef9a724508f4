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
    deinterleave_tags,
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
    """Evaluation samples of one question, indexed [tag][sample]: n_t samples after tag t (n_t may differ between
    tags, and be 0: see :func:`sample_tags`), each tag's in generation order."""

    id: str
    answer: str | None
    scores: list[list[float | None]]  # [N][n_t] verifier scores (None = not scorable)
    answers: list[list[str | None]]  # [N][n_t] extracted answers (None: none found), for majority voting
    lengths: list[list[int]]  # [N][n_t] generated tokens
    texts: list[list[str]]  # [N][n_t]
    strategies: list[list[str | None]] = field(default_factory=list)  # [N][n_t] if a classifier is set
    policy: list[float] = field(default_factory=list)  # [N] the model's tag distribution pi(i | x)
    truncated: list[list[bool]] = field(default_factory=list)  # [N][n_t] hit max_new_tokens (empty: unknown)


TAG_SAMPLING = ("even", "default", "policy")


def sample_tags(num_tags: int, samples: int, tag_sampling: str, default_tag: int,
                policy: Sequence[float] | None = None, rng: np.random.Generator | None = None) -> list[int]:
    """The tag of each of a question's ``samples`` evaluation samples, grouped by tag in tag order.

    ``even``: split over the N tags as evenly as possible, the remainder to the lowest tags (32 over 6 tags:
    6, 6, 5, 5, 5, 5; the paper's sot-N sampling); ``default``: all after ``default_tag``; ``policy``: each drawn
    from the model's tag distribution ``policy`` [N] with ``rng``.
    """
    if tag_sampling == "even":
        base, extra = divmod(samples, num_tags)
        return [tag for tag in range(num_tags) for _ in range(base + (tag < extra))]
    if tag_sampling == "default":
        return [default_tag] * samples
    if tag_sampling == "policy":
        weights = np.asarray(policy, dtype=np.float64)
        return sorted(rng.choice(num_tags, size=samples, p=weights / weights.sum()).tolist())
    raise ValueError(f"tag_sampling must be one of {TAG_SAMPLING}, got {tag_sampling!r}")


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
    tags: Sequence[Sequence[int]],
    num_tags: int,
    extract_answer: Callable[[str], str | None],
    classify_strategy: Callable[[str], str | None] | None = None,
    truncated: Sequence[bool] | None = None,
) -> list[QuestionEvaluation]:
    """Flat samples, ordered [question, sample] with ``tags[q]`` the tag of each of question q's samples, regrouped
    per question as [tag][sample] (each tag's samples in their order); ``policy`` [B][N] is each question's tag
    distribution."""
    results, position = [], 0
    for q, question_id in enumerate(ids):
        grids: dict[str, list[list]] = {key: [[] for _ in range(num_tags)] for key in
                                         ("scores", "answers", "lengths", "texts", "strategies", "truncated")}
        for tag in tags[q]:
            text = texts[position]
            grids["scores"][tag].append(scores[position])
            grids["answers"][tag].append(extract_answer(text))
            grids["lengths"][tag].append(lengths[position])
            grids["texts"][tag].append(text)
            if classify_strategy is not None:
                grids["strategies"][tag].append(classify_strategy(text))
            if truncated is not None:
                grids["truncated"][tag].append(bool(truncated[position]))
            position += 1
        results.append(QuestionEvaluation(
            id=question_id, answer=gold[q], scores=grids["scores"], answers=grids["answers"],
            lengths=grids["lengths"], texts=grids["texts"],
            strategies=grids["strategies"] if classify_strategy is not None else [], policy=policy[q],
            truncated=grids["truncated"] if truncated is not None else [],
        ))
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
    k: int | Sequence[int],
    same_answer: Callable[[str, str], bool] | None,
    policy_tags: dict[str, int],
    fork_policy: str,
    purity_tags: list[int] | None = None,
) -> dict[str, float]:
    """Per-tag pass@1/len/maj(/purity), pass@k, cons@N, cons@k, single-shot pass@1 per policy, distinctness.

    Samples may be ragged (n_t per tag, some 0: :func:`sample_tags`); every mean runs over the samples that exist
    and never divides by a count that was not generated. Rules:

    - ``tag{i}/pass@1``: per question, the mean score of tag i's scored samples; averaged over the questions that
      have any (absent when no question has a sample of tag i). ``tag{i}/samples``: how many there are.
    - ``pass@1/samples``: per question the mean over all its scored samples, averaged over questions (the
      protocol's pass@1: with ``tag_sampling: default`` that of the default tag, with ``even`` that of all tags).
    - ``pass@{k}`` for each k (unbiased, Chen et al.) over the questions with at least k scored samples;
      ``pass@k`` is the largest k's (kept for single-k configs).
    - Majority votes (DESIGN.md §2) count answers that ``same_answer`` (the verifier's equivalence; None: exact
      string equality) says are equal as one group; None answers do not vote; a vote is correct when the winning
      group's first member was scored correct; **ties go to the group whose first member came earliest in voting
      order**. ``cons@N`` (native): round r votes over sample r of every tag, complete rounds only (min_t n_t),
      averaged over rounds, then questions. ``cons@{k}``: one vote over the first k samples in tag-interleaved
      order (tag 1 sample 1, tag 2 sample 1, ..., a tag with fewer samples dropping out), over the questions with
      at least k. ``tag{i}/maj@{n}``: one vote over tag i's n samples, when every question has the same n > 1.
      Questions without any score (no gold answer) do not vote.
    - ``tag{i}/len``, ``tag{i}/len_median``, ``tag{i}/truncated``: mean and median generated tokens and the share
      that hit ``max_new_tokens``; ``len``, ``len_median``, ``truncated`` over all samples.

    ``policy_tags`` maps the tag-picking policies (``coverage``, ``fixed``) to their tag; ``uniform`` and
    ``best_tag`` are computed from the tags that have samples; ``learned`` (expected pass@1 of a tag drawn from
    the model's own tag distribution) and ``argmax`` (its most likely tag) per question, where every tag has
    samples. ``purity_tags`` (the tags trained on) enables purity, averaged over them; leave it None when there is
    no strategy classifier.
    """
    ks = sorted({k} if isinstance(k, int) else set(k))
    metrics: dict[str, float] = {}
    tag_pass: dict[int, float] = {}
    for tag in range(num_tags):
        per_question = [np.mean(scored) for e in evaluations if (scored := [s for s in e.scores[tag] if s is not None])]
        lengths = [length for e in evaluations for length in e.lengths[tag]]
        if not lengths:
            continue
        metrics[f"tag{tag + 1}/samples"] = float(len(lengths))
        if per_question:
            tag_pass[tag] = metrics[f"tag{tag + 1}/pass@1"] = float(np.mean(per_question))
        metrics[f"tag{tag + 1}/len"] = float(np.mean(lengths))
        metrics[f"tag{tag + 1}/len_median"] = float(np.median(lengths))
        cut = [t for e in evaluations if e.truncated for t in e.truncated[tag]]
        if cut:
            metrics[f"tag{tag + 1}/truncated"] = float(np.mean(cut))
    pass_k: dict[int, list[float]] = {size: [] for size in ks}
    cons_k: dict[int, list[float]] = {size: [] for size in ks}
    cons_n, per_question_pass = [], []
    maj: dict[int, list[float]] = {tag: [] for tag in range(num_tags)}
    for e in evaluations:
        flat = [s for row in e.scores for s in row if s is not None]
        if not flat:
            continue  # nothing scored (no gold answer): no pass@k, no vote
        per_question_pass.append(float(np.mean(flat)))
        for size in ks:
            if len(flat) >= size:
                pass_k[size].append(pass_at_k(len(flat), int(sum(s > 0.5 for s in flat)), size))
        counts = [len(row) for row in e.answers]
        interleaved = answer_groups(interleave_tags(e.answers), same_answer or operator.eq)  # [sum n_t]
        groups = deinterleave_tags(interleaved, counts)  # [N][n_t], group ids shared across tags
        if min(counts) > 0:
            cons_n.append(native_cons_at_n(groups, e.scores))
        for size in ks:
            if len(interleaved) >= size:
                cons_k[size].append(cons_at_k(interleaved, interleave_tags(e.scores), size))
        for tag in range(num_tags):
            if counts[tag] > 1:
                maj[tag].append(maj_at_k(groups[tag], e.scores[tag], counts[tag]))
    if per_question_pass:
        metrics["pass@1/samples"] = float(np.mean(per_question_pass))
    for size in ks:
        if pass_k[size]:
            metrics[f"pass@{size}"] = float(np.mean(pass_k[size]))
        if cons_k[size]:
            metrics[f"cons@{size}"] = float(np.mean(cons_k[size]))
    if pass_k[ks[-1]]:
        metrics["pass@k"] = metrics[f"pass@{ks[-1]}"]
    if cons_n:
        metrics["cons@N"] = float(np.mean(cons_n))
    for tag in range(num_tags):
        sizes = {len(e.answers[tag]) for e in evaluations if any(s is not None for row in e.scores for s in row)}
        if maj[tag] and len(sizes) == 1 and len(maj[tag]) == len(per_question_pass):
            metrics[f"tag{tag + 1}/maj@{sizes.pop()}"] = float(np.mean(maj[tag]))
    for policy, tag in policy_tags.items():
        if tag in tag_pass:
            metrics[f"pass@1/{policy}"] = tag_pass[tag]
    if tag_pass:
        metrics["pass@1/uniform"] = float(np.mean(list(tag_pass.values())))
        metrics["pass@1/best_tag"] = max(tag_pass.values())
    every_tag_sampled = all(all(row for row in e.scores) for e in evaluations)
    if evaluations and every_tag_sampled and all(e.policy for e in evaluations):
        learned, argmax = [], []
        for e in evaluations:
            per_tag = [float(np.mean([s for s in row if s is not None] or [0.0])) for row in e.scores]  # [N]
            learned.append(float(np.dot(e.policy, per_tag)))  # expected pass@1 of a tag drawn from pi(. | x)
            argmax.append(per_tag[int(np.argmax(e.policy))])
        metrics["pass@1/learned"] = float(np.mean(learned))
        metrics["pass@1/argmax"] = float(np.mean(argmax))
    if f"pass@1/{fork_policy}" in metrics:
        metrics["pass@1"] = metrics[f"pass@1/{fork_policy}"]
    elif fork_policy in ("learned", "argmax") and not (evaluations and all(e.policy for e in evaluations)):
        raise ValueError(f"fork_policy={fork_policy} needs the model's tag distribution for every question "
                         "(QuestionEvaluation.policy); use coverage, fixed or uniform")
    elif "pass@1/samples" in metrics:  # the policy's tag has no samples under this protocol: the samples' pass@1
        metrics["pass@1"] = metrics["pass@1/samples"]
    all_lengths = [length for e in evaluations for row in e.lengths for length in row]
    if all_lengths:
        metrics["len"] = float(np.mean(all_lengths))
        metrics["len_median"] = float(np.median(all_lengths))
    cut = [t for e in evaluations for row in e.truncated for t in row]
    if cut:
        metrics["truncated"] = float(np.mean(cut))
    sampled_texts = [[row for row in e.texts if row] for e in evaluations]
    metrics["distinctness"] = float(np.mean([distinctness(texts) for texts in sampled_texts])) if sampled_texts else 0.0
    if purity_tags is not None:
        for tag in range(num_tags):
            labels = [label for e in evaluations for label in (e.strategies[tag] if e.strategies else [])]
            metrics[f"tag{tag + 1}/purity"] = strategy_purity(labels)
        metrics["purity"] = float(np.mean([metrics[f"tag{tag + 1}/purity"] for tag in purity_tags]))
    return metrics
