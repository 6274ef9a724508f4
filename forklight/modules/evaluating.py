"""``Evaluator``: the evaluation loop of DESIGN.md §2, for every forklight module.

For every question, ``samples_per_question`` completions (default ``n_per_tag`` after every tag) after the tags
of ``eval_tag_sampling`` (:func:`forklight.evaluation.sample_tags`), sampled through the module's generation engine
(``model.engine``) at ``eval_temperature`` / ``eval_top_p``, scored by the verifier, gathered across ranks and
logged per tag and overall under ``val/`` or ``test/`` (pass@1, pass@k, cons@N, cons@k, purity, length,
truncation, distinctness: :func:`forklight.evaluation.evaluation_metrics`). ``forklight test`` also writes every
sample, ``results.json`` and ``results.md`` to ``eval_output`` and resumes from it (:mod:`forklight.results`).
``forklight predict`` writes one row per completion instead (:meth:`Evaluator.predict_rows`).

:class:`~forklight.modules.base.ForkModule` holds one ``Evaluator`` (``module.evaluator``) and its
``validation_step``, ``test_step``, ``predict_step`` and epoch-end hooks call it; it reads the
module's settings (``hparams``), model, verifier and tag coverage, and keeps only the evaluation's
own state: the questions evaluated so far, the verifier faults, and the last gathered evaluation.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter

import lightning as L
import numpy as np
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from forklight.data.rendering import TraceSetBatch
from forklight.evaluation import (
    TAG_SAMPLING,
    QuestionEvaluation,
    choose_tags,
    evaluation_metrics,
    every_tag,
    prediction_rows,
    question_evaluations,
    sample_tags,
    unique_questions,
    used_tags,
)
from forklight.results import SampleStore, evaluation_of_rows, sample_rows, weights_hash, write_results
from forklight.rollout import Completion
from forklight.sharding import forward_is_collective

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
    if hp.get("eval_tag_sampling", "even") not in TAG_SAMPLING:
        raise ValueError(f"model.eval_tag_sampling must be one of {TAG_SAMPLING}, got {hp.eval_tag_sampling!r}")
    if hp.get("samples_per_question") is not None and hp.samples_per_question < 1:
        raise ValueError(f"model.samples_per_question must be >= 1 or null, got {hp.samples_per_question}")
    samples = samples_per_question(hp)
    ks = hp.pass_k if isinstance(hp.pass_k, list) else [hp.pass_k] if hp.pass_k is not None else []
    if isinstance(hp.pass_k, list) and not ks:
        raise ValueError("model.pass_k is an empty list; give at least one k, or null for all samples")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= samples:
            raise ValueError(f"model.pass_k must be in [1, samples per question = {samples}] (samples_per_question, "
                             f"default num_fork_tokens * n_per_tag), got {k!r}")


def samples_per_question(hp) -> int:
    """S: ``samples_per_question``, default ``num_fork_tokens * n_per_tag``."""
    given = hp.get("samples_per_question")
    return given if given is not None else hp.num_fork_tokens * hp.n_per_tag


class Evaluator:
    def __init__(self, module: L.LightningModule) -> None:
        self.module = module  # the ForkModule it evaluates (not imported: base.py imports this room)
        self.collected: list[QuestionEvaluation] = []  # this rank's questions of the running evaluation
        self.faults: Counter[str] = Counter()  # reward_errors, reward_timeouts of the running evaluation
        self.last: list[QuestionEvaluation] = []  # the last evaluation, all ranks' (read by callbacks)
        self._store: SampleStore | None = None  # the running test's samples on disk (store)
        self.resumed = 0  # questions of the running test read back from an earlier run

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

    def sample_plan(self, batch: TraceSetBatch, policy: list[list[float]]) -> list[list[int]]:
        """The tag of each evaluation sample of each question (``samples_per_question``, ``eval_tag_sampling``); the
        ``policy`` draws are seeded by (``seed``, question id): the same on every rank, run and resume."""
        module, hp = self.module, self.module.hparams
        num_tags, samples = len(module.fork_token_ids), samples_per_question(hp)
        plans = []
        for question_id, row in zip(batch.ids, policy):
            rng = np.random.default_rng([hp.seed, zlib.crc32(str(question_id).encode())])
            plans.append(sample_tags(num_tags, samples, hp.get("eval_tag_sampling", "even"), module.default_tag, row, rng))
        return plans

    def evaluate_batch(self, batch: TraceSetBatch, batch_idx: int = 0) -> list[QuestionEvaluation]:
        """Sample each question's evaluation samples (:meth:`sample_plan`) and score them."""
        module = self.module
        policy = module.fork_policy_of(batch.prompt_ids).exp().tolist()  # [B][N]
        tags = self.sample_plan(batch, policy)
        completions, scores, _ = self.sample(batch, tags, batch_idx, policy)
        return question_evaluations(
            batch.ids, batch.answers, [c.text for c in completions], [c.length for c in completions], scores,
            policy, tags, len(module.fork_token_ids), module.extract_answer, module.classify_strategy,
            truncated=[c.truncated for c in completions],
        )

    def store(self) -> SampleStore | None:
        """Where ``forklight test`` keeps its samples (``eval_output``); None outside a test run."""
        module = self.module
        if module._trainer is None or not module.trainer.testing:
            return None
        if self._store is None:
            hp, trainer = module.hparams, module.trainer
            directory = hp.get("eval_output") or os.path.join(trainer.log_dir or trainer.default_root_dir, "evaluation")
            resume, reuse = bool(hp.get("eval_resume", True)), True
            if resume and forward_is_collective(module.model):  # a rank with nothing to generate would hang the rest
                rank_zero_warn("model.eval_resume: a sharded (FSDP) model generates collectively, so every question "
                               "is generated again; resume works on one device, DDP, or with engine: vllm")
                reuse = False
            self._store = SampleStore(directory, self.identity(), samples_per_question(hp), trainer.global_rank,
                                      trainer.world_size, resume, reuse)
        return self._store

    def data_settings(self) -> dict:
        """The running trainer's datamodule's hyperparameters ({} without one)."""
        module = self.module
        datamodule = getattr(module.trainer, "datamodule", None) if module._trainer is not None else None
        return dict(getattr(datamodule, "hparams", {}) or {})

    def data_name(self) -> str:
        """What was evaluated, for the results table: the benchmark, the toy task, or the test file's name."""
        data = self.data_settings()
        if data.get("benchmark"):
            return data["benchmark"]
        if data.get("test"):
            return os.path.basename(str(data["test"]).rstrip("/"))
        return "toy" if data.get("toy") else "data"

    def identity(self) -> dict:
        """The protocol and the model of this evaluation (``protocol.json``, ``results.json``)."""
        module, hp = self.module, self.module.hparams
        data = self.data_settings()
        path = hp.get("init_from") or hp.get("name_or_path")
        resolved = module.starting_point.path if module.starting_point is not None else path
        return {
            "protocol": {
                "benchmark": data.get("benchmark"), "data": data.get("test"), "prompt_template": data.get("prompt_template"),
                "system_prompt": data.get("system_prompt"), "fork_tokens": list(module.fork_tokens),
                "samples_per_question": samples_per_question(hp), "tag_sampling": hp.get("eval_tag_sampling", "even"),
                "temperature": hp.eval_temperature, "top_p": hp.eval_top_p, "max_new_tokens": hp.max_new_tokens,
                "engine": hp.engine, "verifier": str(hp.verifier), "fork_policy": hp.fork_policy,
                "default_tag": module.default_tag, "seed": hp.seed,
            },
            "model": {"path": str(resolved) if resolved else None, "weights_sha256": weights_hash(str(resolved) if resolved else None)},
        }

    def collect(self, batch: TraceSetBatch, batch_idx: int) -> None:
        """Evaluate a validation or test batch and keep it for :meth:`log`; a test run re-uses the questions its
        ``eval_output`` already holds and appends the new ones there."""
        store = self.store()
        if store is None:
            self.collected.extend(self.evaluate_batch(batch, batch_idx))
            return
        module = self.module
        todo = [q for q, question_id in enumerate(batch.ids) if str(question_id) not in store.finished]
        fresh = iter(self.evaluate_batch(batch.select(todo), batch_idx) if todo else [])
        for question_id in batch.ids:
            rows = store.finished.get(str(question_id))
            if rows is not None:
                self.collected.append(evaluation_of_rows(rows, len(module.fork_token_ids), module.classify_strategy))
                self.resumed += 1
                continue
            evaluation = next(fresh)
            store.append(sample_rows(evaluation, list(module.fork_tokens)))
            self.collected.append(evaluation)

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

    def pass_ks(self) -> list[int]:
        """The k of ``pass@{k}`` and ``cons@{k}`` (``pass_k``; default all samples of a question)."""
        hp = self.module.hparams
        if hp.pass_k is None:
            return [samples_per_question(hp)]
        return sorted(set(hp.pass_k)) if isinstance(hp.pass_k, list) else [hp.pass_k]

    def metrics(self, evaluations: list[QuestionEvaluation]) -> dict[str, float]:
        """Per-tag and overall metrics of DESIGN.md §2 (keys without the ``val/`` prefix)."""
        module, hp = self.module, self.module.hparams
        num_tags = len(module.fork_token_ids)
        return evaluation_metrics(
            evaluations,
            num_tags=num_tags,
            k=self.pass_ks(),
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
        store, self._store = self._store, None
        resumed, self.resumed = self.resumed, 0
        if not evaluations:
            return
        metrics = self.metrics(evaluations)
        for key, value in metrics.items():
            # Every rank holds the same gathered evaluations, hence the same value: max keeps it exactly.
            module.log(f"{stage}/{key}", value, sync_dist=True, reduce_fx="max")
        if store is not None and module.trainer.is_global_zero:
            identity = store.identity
            store.merge(evaluations, list(module.fork_tokens))
            write_results(store.directory, metrics, identity, self.data_name(),
                          len(module.fork_token_ids), self.pass_ks(), len(evaluations))
            rank_zero_info(f"forklight test: {len(evaluations)} questions ({resumed} re-used from an earlier run on "
                           f"this rank); results in {store.directory}/results.json, results.md, samples.jsonl")
