"""GRPO over every completion token: the SFT+GRPO baseline of the paper (DESIGN.md §1).

Run on the toy, starting from the SFT-mixed toy run (``forklight fit -c configs/ssft.yaml -c
configs/sft_mixed.yaml`` first)::

    forklight fit -c configs/grpo.yaml

Each step, per question: G completions after the prompt and one fixed tag (``rollout_tag``,
default the model's default tag), rewards from the verifier, group advantages, then the
clipped token-level objective over all completion tokens with gradient (this full forward and
backward over the completions is what GFPO avoids), plus an optional k3 KL to a frozen copy
of the starting model. ``loss_type`` picks the normalisation: ``grpo`` (per-sequence token
mean), ``dapo`` (all tokens of the batch), ``dr_grpo`` (a constant: G * max_completion_tokens).
"""

from __future__ import annotations

import copy

import torch

from forklight.data.rendering import IGNORE_INDEX, assemble_rows
from forklight.losses import GRPO_LOSS_TYPES, grpo_loss, grpo_normaliser, supervised_mask, token_nll
from forklight.modules.rl import RLModule


class GRPOModule(RLModule):
    def __init__(self, loss_type: str = "dapo", rollout_tag: int | None = None, **kwargs) -> None:
        """Token-level GRPO with a fixed tag.

        Args:
            loss_type: ``grpo``, ``dapo`` or ``dr_grpo`` (token normalisation; see the module docstring).
            rollout_tag: tag index (0-based) every rollout follows; default: the model's default tag.
        """
        super().__init__(**kwargs)
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"model.loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        if rollout_tag is not None and not 0 <= rollout_tag < len(self.fork_token_ids):
            raise ValueError(f"model.rollout_tag must be in [0, {len(self.fork_token_ids) - 1}] or null, got {rollout_tag}")
        self.save_init_hyperparameters()
        self._reference: list = []  # the frozen starting model (kl_coef > 0), kept out of the module tree

    def on_model_built(self) -> None:  # starting weights (init_from) are loaded, no resume yet, not sharded
        if self.hparams.kl_coef > 0:  # FSDP2 shards the frozen copy like the policy
            self._reference = [self.shard(copy.deepcopy(self.model).eval().requires_grad_(False))]

    @property
    def reference_model(self):
        """The frozen starting model (not saved in checkpoints: rebuilt from ``init_from``)."""
        if not self._reference:
            return None
        return self._reference[0].to(self.device)

    def token_log_probs(self, model, rows) -> torch.Tensor:
        """log pi(token) of every next token of ``rows`` [S, T-1] (0 on unsupervised positions)."""
        logits = model(input_ids=rows.input_ids).logits  # [S, T, V]; right padding needs no mask
        return -token_nll(logits, rows.labels)

    def prepare_update(self, batch, batch_idx: int) -> dict:
        hp = self.hparams
        tag = hp.rollout_tag if hp.rollout_tag is not None else self.default_tag
        groups = self.rollouts(batch, [[tag] * hp.group_size for _ in batch.ids], batch_idx)
        rewards, valid = self.rewards(batch, groups)  # [B, G]
        self.log_rollouts(groups, rewards, valid)
        device = self.device
        prompts, continuations = [], []
        for group in groups:
            for completion in group.completions:
                prompts.append(torch.tensor(group.prompt_ids, dtype=torch.long, device=device))
                continuations.append(torch.tensor(completion.sampled_ids, dtype=torch.long, device=device))
        rows = assemble_rows(prompts, [self.fork_token_ids[tag]] * len(prompts), continuations, self.tokenizer.pad_token_id)
        rows.labels[~valid.flatten().to(device)] = IGNORE_INDEX  # skipped samples get no loss
        mask = supervised_mask(rows.labels)  # [S, T-1]
        context = {"rows": rows, "mask": mask, "old": None, "ref": None,
                   "advantages": self.advantages(rewards, valid).flatten().to(device),  # [S]
                   # the loss's denominator over every rank's batch (see losses.grpo_loss)
                   "global_count": self.sum_over_ranks(grpo_normaliser(mask, hp.loss_type, hp.max_completion_tokens))}
        with torch.no_grad():
            if hp.num_iterations > 1:
                context["old"] = self.token_log_probs(self.model, rows)
            if self.reference_model is not None:
                context["ref"] = self.token_log_probs(self.reference_model, rows)
        return context

    def update_loss(self, context: dict, iteration: int) -> dict[str, torch.Tensor]:
        hp = self.hparams
        log_probs = self.token_log_probs(self.model, context["rows"])  # [S, T-1]
        old = context["old"] if context["old"] is not None else log_probs.detach()
        return grpo_loss(
            log_probs, old, context["ref"], context["advantages"], context["mask"], hp.loss_type,
            hp.clip_eps, hp.kl_coef, hp.max_completion_tokens,
            global_count=context["global_count"], world_size=self.trainer.world_size if self._trainer else 1,
        )
