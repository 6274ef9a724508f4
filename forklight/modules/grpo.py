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

Token probabilities are those of the sampling distribution: ``softmax(logits / rollout_temperature)``,
without dropout (as TRL; top-p truncation, ``rollout_top_p < 1``, is not renormalised in them, as in
TRL). ``rollout_temperature: 0`` (greedy) is refused: greedy decoding has no token probabilities and
gives every completion of a group the same tokens. ``update_micro_batch_rows`` runs the update (and
the old/reference log-prob forwards) over chunks of rows, each chunk's loss divided by the whole
batch's denominator: the same step as one backward over all B*G rows, in less memory (TRL's
per-device batch with gradient accumulation; ``trainer.accumulate_grad_batches`` must stay 1).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from forklight.data.rendering import IGNORE_INDEX, Rows, assemble_rows, repack_rows
from forklight.head import scored_positions
from forklight.losses import GRPO_LOSS_TYPES, LossParts, grpo_loss, grpo_normaliser, supervised_mask
from forklight.modules.rl import RLModule, without_dropout


@dataclass
class GRPOUpdate:
    """One step's scored rollouts as training rows, what the GRPO loss needs (S = B*G completions)."""

    rows: Rows  # [S, T] each: prompt | tag | completion (labels only on the completion and its stop token)
    mask: torch.Tensor  # [S, T-1] 1 on the supervised next tokens (0 for skipped samples)
    advantages: torch.Tensor  # [S] one per completion
    global_count: torch.Tensor  # [] the loss's denominator over every rank's batch (losses.grpo_normaliser)
    chunks: list[slice]  # the row chunks of the update, as many on every rank
    old_log_probs: torch.Tensor | None  # [S, T-1] log pi_old of each token; None when num_iterations = 1 (ratio 1)
    ref_log_probs: torch.Tensor | None  # [S, T-1] log pi_ref of each token; None when kl_coef = 0


class GRPOModule(RLModule[GRPOUpdate]):
    def __init__(self, loss_type: str = "dapo", rollout_tag: int | None = None,
                 update_micro_batch_rows: int | None = None, **kwargs) -> None:
        """Token-level GRPO with a fixed tag.

        Args:
            loss_type: ``grpo``, ``dapo`` or ``dr_grpo`` (token normalisation; see the module docstring).
            rollout_tag: tag index (0-based) every rollout follows; default: the model's default tag.
            update_micro_batch_rows: completions per forward/backward of the update (null = all B*G at once);
                the chunks' gradients add up to the whole batch's, so the step is the same.
        """
        super().__init__(**kwargs)
        if self.hparams.rollout_temperature <= 0:
            raise ValueError(f"model.rollout_temperature must be > 0 for GRPO (its loss needs the probability of each "
                             f"sampled token; 0 = greedy has none), got {self.hparams.rollout_temperature}")
        if update_micro_batch_rows is not None and update_micro_batch_rows < 1:
            raise ValueError(f"model.update_micro_batch_rows must be >= 1 or null, got {update_micro_batch_rows}")
        if loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"model.loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
        if rollout_tag is not None and not 0 <= rollout_tag < len(self.fork_token_ids):
            raise ValueError(f"model.rollout_tag must be in [0, {len(self.fork_token_ids) - 1}] or null, got {rollout_tag}")
        self._reference: list = []  # the frozen starting model (kl_coef > 0), kept out of the module tree

    def on_model_built(self) -> None:  # starting weights loaded (FSDP2 meta_init: still to come), no resume, not sharded
        if self.hparams.kl_coef > 0:  # FSDP2 shards the frozen copy like the policy (meta_init: and fills it alike)
            reference = self.shard(copy.deepcopy(self.model).eval().requires_grad_(False))
            self._reference = [self.fill_shards(reference, frozen_copy=True)]

    @property
    def reference_model(self):
        """The frozen starting model (not saved in checkpoints: rebuilt from ``init_from``)."""
        if not self._reference:
            return None
        return self._reference[0].to(self.device)

    def token_log_probs(self, model, rows: Rows) -> torch.Tensor:
        """log pi(token) of every next token of ``rows`` [S, T-1] (0 on unsupervised positions): the
        distribution the rollouts were sampled from, ``rollout_temperature`` and no dropout. Under ``pack_rows``
        the rows' sequences run packed (:func:`~forklight.data.rendering.repack_rows`) and land back in place."""
        temperature = self.hparams.rollout_temperature
        with without_dropout(model):  # right padding needs no mask
            if self.packing():
                packed = repack_rows(rows, self.tokenizer.pad_token_id, self.hparams.pack_length)
                nll = self.supervised_nll(model, packed.rows.labels, temperature, input_ids=packed.rows.input_ids,
                                          position_ids=packed.rows.position_ids)  # [K]
                at, positions = scored_positions(packed.rows.labels)  # [K], [K] in the packed rows
                at, positions = packed.source_row[at, positions], packed.source_position[at, positions]  # [K], [K]
            else:
                nll = self.supervised_nll(model, rows.labels, temperature, input_ids=rows.input_ids)  # [K]
                at, positions = scored_positions(rows.labels)  # [K], [K]
        log_probs = nll.new_zeros(rows.labels.shape[0], rows.labels.shape[1] - 1)  # [S, T-1]
        return log_probs.index_put((at, positions), -nll)

    def update_row_chunks(self, update: GRPOUpdate) -> list[slice]:
        return update.chunks

    def row_chunks(self, num_rows: int) -> list[slice]:
        """Chunks of ``update_micro_batch_rows`` rows. Data parallel: as many on every rank (a rank with
        fewer rows gets empty chunks, which run one row with no loss), as FSDP's and DDP's collectives need."""
        size = self.hparams.update_micro_batch_rows or num_rows
        chunks = [slice(start, start + size) for start in range(0, num_rows, size)]
        if self.hparams.update_micro_batch_rows is not None and self._trainer is not None and self.trainer.world_size > 1:
            most = int(self.trainer.strategy.reduce(torch.tensor(len(chunks), device=self.device), reduce_op="max"))
            chunks += [slice(0, 0)] * (most - len(chunks))
        return chunks

    def chunk_log_probs(self, model, rows: Rows, chunks: list[slice]) -> torch.Tensor:
        """:meth:`token_log_probs` of all rows, one forward per chunk, [S, T-1] (no gradient)."""
        parts = [self.token_log_probs(model, row_chunk(rows, forward_rows(chunk))) for chunk in chunks]  # empty ones too
        return torch.cat([part for part, chunk in zip(parts, chunks) if chunk.start != chunk.stop])

    def prepare_update(self, batch, batch_idx: int) -> GRPOUpdate:
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
        global_count = self.sum_over_ranks(grpo_normaliser(mask, hp.loss_type, hp.max_completion_tokens))
        chunks = self.row_chunks(len(mask))
        with torch.no_grad():
            old = self.chunk_log_probs(self.model, rows, chunks) if hp.num_iterations > 1 else None
            reference = self.reference_model
            ref = self.chunk_log_probs(reference, rows, chunks) if reference is not None else None
        return GRPOUpdate(rows=rows, mask=mask, advantages=self.advantages(rewards, valid).flatten().to(device),
                          global_count=global_count, chunks=chunks, old_log_probs=old, ref_log_probs=ref)

    def update_loss(self, update: GRPOUpdate, iteration: int, rows: slice | None = None) -> LossParts:
        """The loss of ``rows`` (a chunk of :meth:`update_row_chunks`; None = all rows), divided by the
        whole batch's ``global_count``. An empty chunk takes one row's passes with no loss."""
        hp = self.hparams
        rows = rows if rows is not None else slice(0, update.mask.shape[0])
        weight = 0.0 if rows.start == rows.stop else 1.0
        rows = forward_rows(rows)
        log_probs = self.token_log_probs(self.model, row_chunk(update.rows, rows))  # [s, T-1]
        old = update.old_log_probs[rows] if update.old_log_probs is not None else log_probs.detach()
        ref = update.ref_log_probs[rows] if update.ref_log_probs is not None else None
        return grpo_loss(
            log_probs, old, ref, update.advantages[rows], update.mask[rows] * weight, hp.loss_type,
            hp.clip_eps, hp.kl_coef, hp.max_completion_tokens,
            global_count=update.global_count, world_size=self.trainer.world_size if self._trainer else 1,
        )


def forward_rows(chunk: slice) -> slice:
    """The rows a chunk runs: itself, or for an empty chunk (passes that only keep the ranks in step) row 0."""
    return chunk if chunk.start != chunk.stop else slice(0, 1)


def row_chunk(rows: Rows, chunk: slice) -> Rows:
    """Rows ``chunk`` of ``rows``."""
    return Rows(input_ids=rows.input_ids[chunk], labels=rows.labels[chunk])
