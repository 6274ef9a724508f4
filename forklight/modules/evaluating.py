"""``Evaluator``: the evaluation loop of DESIGN.md §2, for every forklight module.

For every question and every tag, ``n_per_tag`` completions sampled through the module's
generation engine (``model.engine``) at ``eval_temperature`` / ``eval_top_p``, scored by the
verifier, gathered across ranks and logged per tag and overall under ``val/`` or ``test/``
(pass@1, pass@k, cons@N, purity, length, distinctness: :func:`forklight.evaluation.evaluation_metrics`).
``forklight predict`` writes one row per completion instead (:meth:`Evaluator.predict_rows`).

:class:`~forklight.modules.base.ForkModule` holds one ``Evaluator`` (``module.evaluator``) and its
``validation_step``, ``test_step``, ``predict_step`` and epoch-end hooks call it; it reads the
module's settings (``hparams``), model, verifier and tag coverage, and keeps only the evaluation's
own state: the questions evaluated so far, the verifier faults, and the last gathered evaluation.
"""

from __future__ import annotations

from collections import Counter

import lightning as L
import numpy as np
import torch.distributed as dist

from forklight.data.rendering import TraceSetBatch
from forklight.evaluation import (
    QuestionEvaluation,
    choose_tags,
    evaluation_metrics,
    every_tag,
    prediction_rows,
    question_evaluations,
    unique_questions,
    used_tags,
)
from forklight.rollout import Completion

FORK_POLICIES = ("learned", "argmax", "coverage", "fixed", "uniform")
PREDICT_TAGS = ("all", "policy")


def check_evaluation_settings(hp) -> None:
    """The module's evaluation settings (``hparams``) are in range; else an error naming the key."""
    if hp.fork_policy not in FORK_POLICIES:
        raise ValueError(f"model.fork_policy must be one of {FORK_POLICIES}, got {hp.fork_policy!r}")
    if hp.predict_tags not in PREDICT_TAGS:
        raise ValueError(f"model.predict_tags must be one of {PREDICT_TAGS}, got {hp.predict_tags!r}")
    if not 0 <= hp.fixed_tag < hp.num_fork_tokens:
        raise ValueError(f"model.fixed_tag must be in [0, {hp.num_fork_tokens - 1}], got {hp.fixed_tag}")
    for key in ("n_per_tag", "max_new_tokens", "generation_batch_size"):
        if hp[key] < 1:
            raise ValueError(f"model.{key} must be >= 1, got {hp[key]}")
    samples = hp.num_fork_tokens * hp.n_per_tag
    if hp.pass_k is not None and not 1 <= hp.pass_k <= samples:
        raise ValueError(f"model.pass_k must be in [1, num_fork_tokens * n_per_tag = {samples}], got {hp.pass_k}")


class Evaluator:
    def __init__(self, module: L.LightningModule) -> None:
        self.module = module  # the ForkModule it evaluates (not imported: base.py imports this room)
        self.collected: list[QuestionEvaluation] = []  # this rank's questions of the running evaluation
        self.faults: Counter[str] = Counter()  # reward_errors, reward_timeouts of the running evaluation
        self.last: list[QuestionEvaluation] = []  # the last evaluation, all ranks' (read by callbacks)

    def sample(self, batch: TraceSetBatch, tags: list[list[int]], batch_idx: int = 0,
               policy: list[list[float]] | None = None) -> tuple[list[Completion], list, list[list[float]]]:
        """Generate one completion per entry of ``tags[q]`` (tag indices) after question q's prompt, and
        score them: ``(completions, scores, policy)``; ``policy`` [B][N] is the model's tag distribution
        (computed here unless the caller already has it)."""
        module, hp = self.module, self.module.hparams
        prefixes = [prompt.tolist() + [module.fork_token_ids[tag]]
                    for prompt, question_tags in zip(batch.prompt_ids, tags) for tag in question_tags]
        settings = module.sampling_settings(hp.eval_temperature, hp.eval_top_p, hp.max_new_tokens,
                                            seed=module._sampling_seed(batch_idx))
        completions = module.generation_engine().generate(prefixes, settings, module.generation_progress())
        if policy is None:
            policy = module.fork_policy_of(batch.prompt_ids).exp().tolist()  # [B][N]
        scores, outcome = module.score(batch, [c.text for c in completions], [len(t) for t in tags])
        if outcome != "ok":
            self.faults["reward_errors" if outcome == "error" else "reward_timeouts"] += len(completions)
        return completions, scores, policy

    def evaluate_batch(self, batch: TraceSetBatch, batch_idx: int = 0) -> list[QuestionEvaluation]:
        """Sample ``n_per_tag`` completions per (question, tag) and score them."""
        module = self.module
        num_tags, n = len(module.fork_token_ids), module.hparams.n_per_tag
        completions, scores, policy = self.sample(batch, [every_tag(num_tags, n)] * len(batch), batch_idx)
        return question_evaluations(
            batch.ids, batch.answers, [c.text for c in completions], [c.length for c in completions], scores,
            policy, num_tags, n, module.extract_answer, module.classify_strategy,
        )

    def collect(self, batch: TraceSetBatch, batch_idx: int) -> None:
        """Evaluate a validation or test batch and keep it for :meth:`log`."""
        self.collected.extend(self.evaluate_batch(batch, batch_idx))

    def predict_rows(self, batch: TraceSetBatch, batch_idx: int) -> list[dict]:
        """One row per completion: its question, tag, text, extracted answer and verifier score.

        ``predict_tags: all``: ``n_per_tag`` completions after every tag; ``policy``: ``n_per_tag``
        completions per question, each after a tag chosen by ``fork_policy`` (``learned`` samples
        the model's tag distribution).
        """
        module, hp = self.module, self.module.hparams
        num_tags = len(module.fork_token_ids)
        policy = module.fork_policy_of(batch.prompt_ids).exp().tolist()  # [B][N]
        if hp.predict_tags == "all":
            tags = [every_tag(num_tags, hp.n_per_tag) for _ in range(len(batch))]
        else:
            rng = np.random.default_rng(module._sampling_seed(batch_idx))
            tags = choose_tags(np.array(policy), hp.fork_policy, hp.n_per_tag, rng,
                               {"coverage": module.default_tag, "fixed": hp.fixed_tag}).tolist()  # [B][n]
        completions, scores, _ = self.sample(batch, tags, batch_idx, policy)
        return prediction_rows(
            batch.ids, batch.answers, tags, [c.text for c in completions], [c.length for c in completions], scores,
            policy, module.fork_tokens, module.extract_answer, "all" if hp.predict_tags == "all" else hp.fork_policy,
            module.default_tag, hp.n_per_tag,
        )

    def metrics(self, evaluations: list[QuestionEvaluation]) -> dict[str, float]:
        """Per-tag and overall metrics of DESIGN.md §2 (keys without the ``val/`` prefix)."""
        module, hp = self.module, self.module.hparams
        num_tags = len(module.fork_token_ids)
        return evaluation_metrics(
            evaluations,
            num_tags=num_tags,
            n_per_tag=hp.n_per_tag,
            k=hp.pass_k or num_tags * hp.n_per_tag,
            same_answer=getattr(module.verifier, "same_answer", None),  # votes group equal answers
            policy_tags={"coverage": module.default_tag, "fixed": hp.fixed_tag},
            fork_policy=hp.fork_policy,
            purity_tags=used_tags(module.tag_coverage.tolist()) if module.classify_strategy is not None else None,
        )

    def gather(self) -> list[QuestionEvaluation]:
        """Every rank's collected questions, each once (this rank's alone without a process group)."""
        local, self.collected = self.collected, []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        gathered: list[list[QuestionEvaluation]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
        return unique_questions(evaluation for rank_list in gathered for evaluation in rank_list)

    def log(self, stage: str) -> None:
        """Log the finished evaluation under ``stage/`` (``val``, ``test``) and keep it as :attr:`last`."""
        module = self.module
        faults, self.faults = self.faults, Counter()
        for key in ("reward_errors", "reward_timeouts"):  # samples scored 0 because the verifier failed
            module.log(f"{stage}/{key}", float(faults[key]), sync_dist=True, reduce_fx="sum")
        evaluations = self.gather()
        self.last = evaluations
        if not evaluations:
            return
        for key, value in self.metrics(evaluations).items():
            # Every rank holds the same gathered evaluations, hence the same value: max keeps it exactly.
            module.log(f"{stage}/{key}", value, sync_dist=True, reduce_fx="max")
