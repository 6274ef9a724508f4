"""``RLModule``: what the RL methods (GFPO, GRPO) share.

Starting weights come from ``init_from`` (an SSFT checkpoint or an HF export; see
:class:`~forklight.modules.base.ForkModule`). Shared here: group rollouts with a seeded sampler, rewards from the verifier, group advantages, rollout
metrics, and the update loop: each training step generates once and then takes
``num_iterations`` optimiser steps on the same rollouts (manual optimisation; every
optimiser step counts towards ``trainer.max_steps``). Every policy forward of the update (old, new
and reference probabilities) runs without dropout, like the rollouts (:func:`without_dropout`), so a
ratio compares the policy that sampled with the one being trained. ``trainer.accumulate_grad_batches``
must stay 1 (Lightning cannot accumulate a manual update); GRPO bounds its update's memory with
``update_micro_batch_rows`` instead.
"""

from __future__ import annotations

import contextlib
import time
from typing import Generic, TypeVar

import numpy as np
import torch

from forklight.errors import ConfigError
from forklight.losses import LossParts, group_advantages, merge_chunk_parts
from forklight.modules.base import ForkModule
from forklight.rollout import RolloutGroup, rollout_groups

Update = TypeVar("Update")  # a method's hand-off from prepare_update to update_loss (GFPOUpdate, GRPOUpdate)


@contextlib.contextmanager
def without_dropout(model: torch.nn.Module):
    """``model`` in eval mode (no dropout, as when sampling) for a policy forward, gradient included.

    Like TRL's ``disable_dropout``, but for the forward only: old, new and reference probabilities then
    come from the distribution the rollouts were sampled from (a ratio is exactly 1 before the first
    update). Modules that gradient-checkpoint (``gradient_checkpointing`` set) keep their own
    ``training`` flag, as Hugging Face recomputes only in training mode; their submodules are in eval mode.
    """
    modes = [(module, module.training) for module in model.modules()]
    for module, training in modes:
        module.training = training and getattr(module, "gradient_checkpointing", False) is True
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


class RLModule(ForkModule, Generic[Update]):
    GOLD_ANSWER_SPLITS = ("train", "val", "test")  # rewards need the training answers too

    def __init__(
        self,
        group_size: int = 8,
        rollout_temperature: float = 1.0,
        rollout_top_p: float = 1.0,
        max_completion_tokens: int = 128,
        num_iterations: int = 1,
        clip_eps: float = 0.2,
        kl_coef: float = 0.0,
        scale_rewards: str = "group",
        max_grad_norm: float | None = 1.0,
        **kwargs,
    ) -> None:
        """Shared RL settings.

        Args:
            group_size: G, completions per question per step.
            rollout_temperature: sampling temperature of the rollouts (0 = greedy; GRPO needs > 0).
            rollout_top_p: nucleus threshold of the rollouts.
            max_completion_tokens: longest rollout completion.
            num_iterations: optimiser steps taken on each batch of rollouts (>= 1; PPO-style reuse).
            clip_eps: ratio clipping of the surrogate objective.
            kl_coef: weight of the KL penalty to the starting model (0 = off).
            scale_rewards: ``group`` (divide advantages by the group's std) or ``none``.
            max_grad_norm: gradient norm clipping per optimiser step (null = off).
        """
        super().__init__(**kwargs)
        if self.hparams.init_from is None and self.hparams.name_or_path is None:
            raise ValueError("RL starts from a trained model: set model.init_args.init_from (an SSFT export or "
                             "checkpoint) or model.init_args.name_or_path")
        for key, value in (("group_size", group_size), ("num_iterations", num_iterations), ("max_completion_tokens", max_completion_tokens)):
            if value < 1:
                raise ValueError(f"model.{key} must be >= 1, got {value}")
        if scale_rewards not in ("group", "none"):
            raise ValueError(f"model.scale_rewards must be 'group' or 'none', got {scale_rewards!r}")
        if not 0 < clip_eps < 1:
            raise ValueError(f"model.clip_eps must be in (0, 1), got {clip_eps}")
        if kl_coef < 0:
            raise ValueError(f"model.kl_coef must be >= 0, got {kl_coef}")
        if rollout_temperature < 0:
            raise ValueError(f"model.rollout_temperature must be >= 0 (0 = greedy), got {rollout_temperature}")
        self.automatic_optimization = False

    def configure_callbacks(self) -> list:
        """No callbacks of its own: the first hook that sees the trainer, before Lightning checks it, so a
        trainer setting that manual optimisation cannot honour gets an error saying what to do instead."""
        trainer = self.trainer
        if trainer.state.fn != "fit":
            return []
        name = type(self).__name__
        if trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={trainer.accumulate_grad_batches}, but {name} optimises manually "
                "(one optimiser step per batch of rollouts and iteration) and Lightning cannot accumulate its "
                "gradients: set trainer.accumulate_grad_batches=1 and raise data.init_args.batch_size for a bigger "
                "step; to bound the memory of GRPO's update, model.init_args.update_micro_batch_rows splits its "
                "backward into chunks of rows that give the same step")
        if trainer.gradient_clip_val:
            raise ValueError(f"trainer.gradient_clip_val={trainer.gradient_clip_val}: {name} optimises manually "
                             "and clips with model.init_args.max_grad_norm instead; unset trainer.gradient_clip_val")
        return []

    # ---- rollouts and rewards --------------------------------------------------------------
    def rollouts(self, batch, tags: list[list[int]], batch_idx: int) -> list[RolloutGroup]:
        """Sample one completion per (question, tag) through the generation engine, with a seed fixed by
        step, batch and rank."""
        hp = self.hparams
        settings = self.sampling_settings(hp.rollout_temperature, hp.rollout_top_p, hp.max_completion_tokens,
                                          seed=self._sampling_seed(batch_idx) + 1)
        return rollout_groups(self.generation_engine(), batch.ids, batch.prompt_ids, tags, self.fork_token_ids,
                              settings, self.generation_progress())

    def rewards(self, batch, groups: list[RolloutGroup]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards, valid), both [B, G]: verifier scores; ``valid`` False where it returned None.

        A verifier that raises or runs past ``model.reward_timeout_s`` scores 0 for the whole batch
        (counted in ``rollout/reward_errors`` / ``rollout/reward_timeouts``); the run goes on.
        """
        texts = [completion.text for group in groups for completion in group.completions]
        scores, outcome = self.score(batch, texts, [len(group.completions) for group in groups])
        size = len(groups)
        self.log("rollout/reward_errors", float(len(texts) if outcome == "error" else 0), batch_size=size)
        self.log("rollout/reward_timeouts", float(len(texts) if outcome == "timeout" else 0), batch_size=size)
        grid = np.array([np.nan if s is None else float(s) for s in scores], dtype=np.float32).reshape(len(groups), -1)
        valid = torch.from_numpy(~np.isnan(grid))
        return torch.from_numpy(np.nan_to_num(grid, nan=0.0)), valid

    def advantages(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return group_advantages(rewards, valid, self.hparams.scale_rewards)  # [B, G]

    def log_rollouts(self, groups: list[RolloutGroup], rewards: torch.Tensor, valid: torch.Tensor) -> None:
        size = len(groups)
        scored = rewards[valid]
        group_std = [rewards[b][valid[b]].std().item() if valid[b].sum() > 1 else 0.0 for b in range(len(groups))]
        completions = [c for group in groups for c in group.completions]
        self.log("rollout/reward_mean", scored.mean().item() if scored.numel() else 0.0, prog_bar=True, batch_size=size)
        self.log("rollout/reward_std", scored.std().item() if scored.numel() > 1 else 0.0, batch_size=size)
        self.log("rollout/frac_zero_std_groups", float(np.mean([s < 1e-8 for s in group_std])), batch_size=size)
        self.log("rollout/len_mean", float(np.mean([c.length for c in completions])), batch_size=size)
        self.log("rollout/truncated_frac", float(np.mean([c.truncated for c in completions])), batch_size=size)
        self.log("rollout/skipped_frac", float((~valid).float().mean()), batch_size=size)

    # ---- the update loop ---------------------------------------------------------------------
    def update_loss(self, update: Update, iteration: int, rows: slice | None = None) -> LossParts:
        """The method's loss on this step's rollouts (with gradient); ``update`` from ``prepare_update``.
        ``rows``: one chunk of :meth:`update_row_chunks` (None: all), its loss divided as the whole batch's."""
        raise NotImplementedError

    def update_row_chunks(self, update: Update) -> list[slice | None]:
        """Row chunks of the update, one backward each; their gradients add up to the whole batch's.
        Default: one backward over everything."""
        return [None]

    def prepare_update(self, batch, batch_idx: int) -> Update:
        """Generate and score this step's rollouts; return what ``update_loss`` needs (the method's dataclass)."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> None:
        hp = self.hparams
        if batch.split:  # a piece of a question would roll its prompt out again in another batch
            question = next(q for q, piece in zip(batch.ids, batch.trained) if piece is not None)
            raise ConfigError(f"data.max_tokens_per_batch split question {question!r} (its prompt and traces exceed the "
                              f"budget) into pieces of its traces, which only SSFT/SFT trains: {type(self).__name__} "
                              f"samples its prompts; raise data.max_tokens_per_batch above the longest question or unset it")
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        started = time.perf_counter()
        update = self.prepare_update(batch, batch_idx)
        generated = time.perf_counter()
        for iteration in range(hp.num_iterations):
            optimizer.zero_grad(set_to_none=True)
            chunks, skipped = [], False
            for rows in self.update_row_chunks(update):  # as many on every rank
                chunk = self.update_loss(update, iteration, rows)
                skipped = self.skip_nonfinite(chunk.loss, batch, batch_idx)  # decided alike on every rank
                if skipped:  # no update: drop what earlier chunks added
                    optimizer.zero_grad(set_to_none=True)
                    break
                self.manual_backward(chunk.loss)
                chunks.append(chunk.detached())
            if not skipped and hp.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=hp.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()  # the step counts towards max_steps either way, as with SSFT
            scheduler.step()
        updated = time.perf_counter()
        size = len(batch)
        if not skipped:  # all ranks or none: the mean over ranks (each has its own questions) is safe
            parts = merge_chunk_parts(chunks)  # the last iteration's, over the whole batch
            self.log("train/loss", parts.loss, prog_bar=True, batch_size=size, sync_dist=True)
            for key in ("kl", "clip_frac", "entropy"):
                if getattr(parts, key) is not None:
                    self.log(f"train/{key}", getattr(parts, key), batch_size=size)
        self.log("train/nonfinite_skipped", float(self.fault_counts["nonfinite_skipped"]), batch_size=size)
        self.log("perf/step_s/generate", generated - started, batch_size=size)
        self.log("perf/step_s/update", updated - generated, batch_size=size)
