"""The shared evaluation loop's aggregation: per-tag pass@1, pass@k, cons@N, policies, purity."""

from __future__ import annotations

import pytest
import torch

from forklight.evaluation import QuestionEvaluation, used_tags


def evaluation(qid, answer, scores, answers, strategies):
    return QuestionEvaluation(
        id=qid, answer=answer, scores=scores, answers=answers,
        lengths=[[len(a or "")] * len(a_row) for a_row, a in zip(answers, [row[0] for row in answers])],
        texts=[[f"so {a}" for a in row] for row in answers], strategies=strategies,
    )


def test_metrics_by_hand(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=3, strategy_classifier="forklight.data.toy:classify_strategy")
    module.tag_coverage.copy_(torch.tensor([1.0, 5.0, 0.0]))  # default tag = tag 2; tag 3 unused
    evaluations = [
        # tag answers 5, 5, 7 -> majority 5 (correct); tags 1 and 2 correct
        evaluation("a", "5", [[1.0], [1.0], [0.0]], [["5"], ["5"], ["7"]], [["column"], ["running"], [None]]),
        # tag answers 1, 2, 9 -> no majority, first answer 1 wins (wrong); only tag 3 correct
        evaluation("b", "9", [[0.0], [0.0], [1.0]], [["1"], ["2"], ["9"]], [["column"], ["split"], [None]]),
    ]
    metrics = module.evaluator.metrics(evaluations)
    assert metrics["tag1/pass@1"] == 0.5 and metrics["tag2/pass@1"] == 0.5 and metrics["tag3/pass@1"] == 0.5
    assert metrics["pass@k"] == 1.0  # k = 3 samples per question: each question has a correct one
    assert metrics["cons@N"] == 0.5
    assert metrics["pass@1/coverage"] == metrics["tag2/pass@1"]
    assert metrics["pass@1"] == metrics["pass@1/coverage"]
    assert metrics["pass@1/uniform"] == pytest.approx(0.5)
    assert metrics["tag1/purity"] == 1.0 and metrics["tag2/purity"] == 0.5 and metrics["tag3/purity"] == 0.0
    assert used_tags(module.tag_coverage.tolist()) == [0, 1]
    assert metrics["purity"] == pytest.approx(0.75)  # mean over used tags only


def test_pass_at_k_with_k_below_the_sample_count(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2, n_per_tag=2, pass_k=1)
    evaluations = [evaluation("a", "5", [[1.0, 0.0], [0.0, 0.0]], [["5", "4"], ["3", "3"]], [])]
    metrics = module.evaluator.metrics(evaluations)
    assert metrics["pass@k"] == pytest.approx(0.25)  # 1 of 4 samples correct, k = 1
    # native cons@N, round by round: (5, 3) tie -> tag 1's 5, correct; (4, 3) tie -> tag 1's 4, wrong
    assert metrics["cons@N"] == pytest.approx(0.5)
    assert metrics["cons@1"] == 1.0  # the first sample in interleaved order: tag 1's 5
    assert metrics["tag1/maj@2"] == 1.0 and metrics["tag2/maj@2"] == 0.0  # tag 1: 5, 4 tie -> 5
    assert "purity" not in metrics


def test_native_cons_at_n_takes_one_sample_per_tag_per_round(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2, n_per_tag=3)
    answers = [["5", "5", "7"], ["5", "7", "7"]]  # [N=2][n=3]
    scores = [[1.0 if a == "5" else 0.0 for a in row] for row in answers]
    metrics = module.evaluator.metrics([evaluation("a", "5", scores, answers, [])])
    # rounds: (5, 5) correct; (5, 7) tie -> tag 1's 5, correct; (7, 7) wrong. Not one vote over all 6.
    assert metrics["cons@N"] == pytest.approx(2 / 3)
    assert metrics["cons@6"] == 1.0  # all 6 samples: 5 and 7 tie at 3, 5 came first (tag 1 sample 1)
    assert metrics["tag1/maj@3"] == 1.0 and metrics["tag2/maj@3"] == 0.0


def test_cons_at_k_takes_the_first_k_samples_in_tag_interleaved_order(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=3, n_per_tag=2, pass_k=3)
    answers = [["7", "7"], ["5", "5"], ["5", "5"]]  # interleaved: 7 5 5 | 7 5 5; tag by tag it would be 7 7 5
    scores = [[1.0 if a == "5" else 0.0 for a in row] for row in answers]
    metrics = module.evaluator.metrics([evaluation("a", "5", scores, answers, [])])
    assert metrics["cons@3"] == 1.0
    assert metrics["cons@N"] == 1.0
    assert metrics["pass@k"] == pytest.approx(1 - 0.0)  # 4 of 6 correct: every 3-subset has one


def test_votes_group_answers_the_math_verifier_counts_as_equal(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=5, verifier="math")
    texts = [r"\boxed{7}", r"\boxed{7}", r"so \boxed{\dfrac{1}{2}}", "The answer is 1/2", "The answer is 0.5"]
    answers = [module.extract_answer(text) for text in texts]
    assert answers == ["7", "7", r"\frac{1}{2}", "1/2", "0.5"]  # as strings, 7 would win the vote 2 to 1
    scores = module.verifier(texts, [r"\frac12"] * len(texts))
    assert scores == [0.0, 0.0, 1.0, 1.0, 1.0]
    question = QuestionEvaluation(id="a", answer=r"\frac12", scores=[[s] for s in scores],
                                  answers=[[a] for a in answers], lengths=[[1]] * 5, texts=[[t] for t in texts])
    metrics = module.evaluator.metrics([question])
    assert metrics["cons@N"] == 1.0  # one round: 1/2 = \frac12 = 0.5 win 3 to 2
    assert metrics["cons@5"] == 1.0


def test_questions_without_scores_do_not_vote(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2)
    scored = evaluation("a", "5", [[1.0], [0.0]], [["5"], ["3"]], [])
    unscored = evaluation("b", None, [[None], [None]], [["5"], ["3"]], [])
    metrics = module.evaluator.metrics([scored, unscored])
    assert metrics["cons@N"] == 1.0 and metrics["cons@2"] == 1.0


def test_learned_and_argmax_policies_by_hand(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=3, n_per_tag=2, fork_policy="learned")
    first = evaluation("a", "5", [[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]], [["5", "5"], ["5", "4"], ["3", "3"]], [])
    first.policy = [0.2, 0.5, 0.3]  # expected pass@1 = 0.2 * 1 + 0.5 * 0.5 + 0.3 * 0 = 0.45; argmax tag 2 -> 0.5
    second = evaluation("b", "9", [[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]], [["1", "1"], ["2", "2"], ["9", "8"]], [])
    second.policy = [0.1, 0.1, 0.8]  # expected 0.8 * 0.5 = 0.4; argmax tag 3 -> 0.5
    metrics = module.evaluator.metrics([first, second])
    assert metrics["pass@1/learned"] == pytest.approx((0.45 + 0.4) / 2)
    assert metrics["pass@1/argmax"] == pytest.approx(0.5)
    assert metrics["pass@1"] == metrics["pass@1/learned"]
    second.policy = []
    with pytest.raises(ValueError, match="fork_policy=learned"):
        module.evaluator.metrics([first, second])


def test_choose_tags_follows_each_policy():
    import numpy as np

    from forklight.evaluation import choose_tags

    policy = np.array([[0.0, 1.0, 0.0], [0.7, 0.2, 0.1]])  # [B=2, N=3]
    rng = np.random.default_rng(0)
    learned = choose_tags(policy, "learned", 2000, rng, {})
    assert (learned[0] == 1).all()  # a one-hot policy always gives its tag
    assert abs((learned[1] == 0).mean() - 0.7) < 0.05 and abs((learned[1] == 2).mean() - 0.1) < 0.03
    assert choose_tags(policy, "argmax", 2, rng, {}).tolist() == [[1, 1], [0, 0]]
    assert choose_tags(policy, "fixed", 1, rng, {"fixed": 2}).tolist() == [[2], [2]]
    assert set(choose_tags(policy, "uniform", 300, rng, {}).ravel().tolist()) == {0, 1, 2}
