"""GFPO: global forking policy optimisation (DESIGN.md §1).

Run on the toy, starting from the SSFT default run (``forklight fit -c configs/ssft.yaml`` first)::

    forklight fit -c configs/gfpo.yaml

The policy is the model's next-token distribution at the tag position restricted to the N fork
tokens, ``pi_theta(i | x) = softmax(logits[fork_ids])_i``. Each step, per question:

1. sample G tags from ``pi_old`` (``tag_sampling: policy``) or G/N of each tag (``stratified``);
2. generate a completion after each ``(x, g_k)`` and score it (rollouts only: never run
   forward with gradient);
3. group advantages ``A_k = (r_k - mean r) / (std r + eps)``;
4. one forward pass over the prompts with gradient (no dropout, as for pi_old), and the loss
   ``-mean_k min(rho_k A_k, clip(rho_k, 1 +- eps) A_k) + beta KL(pi_theta || pi_ref) - c H(pi_theta)``
   (stratified: ``-sum_i pi_theta(i|x) (r_i - mean r)``), with the KL exact over the N tags and
   ``pi_ref`` the starting model's tag distribution, computed once per training question.

``trainable: head`` (default) trains only the fork-token rows of the output layer: the
reasoning modes stay exactly as SSFT left them and only the choice between them is learned
(with tied input/output embeddings the fork tokens' input rows move too). ``all`` trains
every weight through the prompts' forward pass (with ``model.lora``: the adapters and the fork
tokens' rows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from forklight.forking import fork_log_policy
from forklight.losses import LossParts, categorical_entropy, gfpo_loss, stratified_gfpo_loss
from forklight.modules.rl import RLModule, without_dropout

TAG_SAMPLING = ("policy", "stratified")
TRAINABLE = ("head", "all")


@dataclass
class GFPOUpdate:
    """One step's scored rollouts, what the GFPO loss needs (B questions, G samples each, N tags)."""

    prompts: list[torch.Tensor]  # B prompts, each [P_b] token ids: the only forward with gradient
    old_log_policy: torch.Tensor  # [B, N] log pi_old(. | x), the policy that sampled the tags
    ref_log_policy: torch.Tensor | None  # [B, N] log pi_ref(. | x) of the starting model; None when kl_coef = 0
    tags: torch.Tensor  # [B, G] sampled tag indices
    rewards: torch.Tensor  # [B, G] verifier scores (0 where skipped)
    valid: torch.Tensor  # [B, G] bool, False where the verifier skipped a sample
    advantages: torch.Tensor  # [B, G] group advantages


class GFPOModule(RLModule[GFPOUpdate]):
    learns_tag_policy = True  # the update is a policy gradient on pi(i | x)

    def __init__(
        self,
        tag_sampling: str = "policy",
        entropy_coef: float = 0.0,
        trainable: str = "head",
        fork_policy: str = "learned",
        **kwargs,
    ) -> None:
        """Global forking policy optimisation.

        Args:
            tag_sampling: ``policy`` (G tags drawn from pi_old) or ``stratified`` (G/N per tag; G % N == 0).
            entropy_coef: weight of the tag-policy entropy bonus.
            trainable: ``head`` (only the fork-token output rows get gradient) or ``all`` (every weight, or
                with ``model.lora`` the adapters and fork rows).
            fork_policy: single-shot tag choice of ``val/pass@1`` (default ``learned``: the trained policy).
        """
        super().__init__(fork_policy=fork_policy, **kwargs)
        if tag_sampling not in TAG_SAMPLING:
            raise ValueError(f"model.tag_sampling must be one of {TAG_SAMPLING}, got {tag_sampling!r}")
        if trainable not in TRAINABLE:
            raise ValueError(f"model.trainable must be one of {TRAINABLE}, got {trainable!r}")
        if trainable == "head" and self.lora is not None:
            raise ValueError("model.lora trains adapters, but model.trainable=head trains only the fork-token output "
                             "rows; set model.init_args.trainable=all (adapters + fork rows) or drop model.lora")
        num_tags = len(self.fork_token_ids)
        if tag_sampling == "stratified" and self.hparams.group_size % num_tags:
            raise ValueError(f"model.tag_sampling=stratified needs group_size divisible by num_fork_tokens "
                             f"({num_tags}), got group_size={self.hparams.group_size}")
        self.ref_log_policy: dict[str, torch.Tensor] = {}  # question id -> log pi_ref(. | x), [N]

    def on_model_built(self) -> None:
        if self.hparams.trainable == "head":
            for parameter in self.model.parameters():
                parameter.requires_grad_(False)
            head = self.model.get_output_embeddings().weight  # [V, D]
            head.requires_grad_(True)
            rows = torch.zeros(head.shape[0], 1, dtype=head.dtype)  # [V, 1] (on the CPU: the head may be on meta)
            rows[self.fork_token_ids] = 1.0
            self._fork_rows = rows
            head.register_hook(lambda grad: grad * rows.to(grad.device))  # only the fork rows learn

    def on_after_backward(self) -> None:
        """FSDP2 replaces the head parameter (and its hook) by a sharded one: mask its gradient here."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        grad = self.model.get_output_embeddings().weight.grad
        if self.hparams.trainable == "head" and isinstance(grad, DTensor):
            rows = distribute_tensor(self._fork_rows.to(grad.device), grad.device_mesh, grad.placements, src_data_rank=None)
            grad.mul_(rows)  # [V, D] * [V, 1], both sharded by rows

    @property
    def updates_change_completions(self) -> bool:
        """``trainable: head`` moves only the fork tokens' output rows, and a completion never samples a fork token
        (its logit is -inf whatever the row says), so every completion after a tag is exactly what it was: an engine
        on a copy of the weights (vLLM) needs no sync. Unless the embeddings are tied: then the fork tokens' input
        rows move too, and the tag itself, the last token of every prefix, is embedded differently."""
        tied = self.model.get_output_embeddings().weight is self.model.get_input_embeddings().weight
        return self.hparams.trainable == "all" or tied

    def weight_decay(self) -> float:
        if self.hparams.trainable == "head":  # decoupled weight decay would shrink every output row
            return 0.0
        return super().weight_decay()

    # ---- reference policy (exact KL) ---------------------------------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.hparams.kl_coef > 0 and not self.ref_log_policy:  # once per fit (a resume loads it from the checkpoint)
            self.ref_log_policy = self.starting_tag_policy()

    def starting_tag_policy(self) -> dict[str, torch.Tensor]:
        """log pi_ref(. | x) [N] of every training question, the starting model's: computed once, spread over the
        ranks and gathered, so that every rank has all of them (a rank's share of the data changes with the epoch).

        The prompts go in chunks of ``generation_batch_size``, chunk k on rank k % world_size: each chunk is the batch
        one process would run, so the values do not depend on the number of ranks. Every rank runs as many forwards
        (a rank short of a chunk repeats its last one and drops it): under FSDP each forward is a collective."""
        loader = self.trainer.datamodule.train_dataloader()
        ids, prompts = [], []
        for batch in DataLoader(loader.dataset, batch_size=loader.batch_size or 1, collate_fn=loader.collate_fn):
            ids.extend(batch.ids)
            prompts.extend(batch.prompt_ids)
        size, world, rank = self.hparams.generation_batch_size, self.trainer.world_size, self.trainer.global_rank
        starts = list(range(0, len(prompts), size))
        mine = starts[rank::world]
        policy: dict[str, torch.Tensor] = {}
        for round_index in range(math.ceil(len(starts) / world)):
            start = mine[min(round_index, len(mine) - 1)] if mine else 0
            log_policy = self.fork_policy_of(prompts[start : start + size]).cpu()  # [b, N]
            if round_index < len(mine):
                policy.update(zip(ids[start : start + size], log_policy))
        if world > 1:
            gathered: list = [None] * world
            torch.distributed.all_gather_object(gathered, policy)
            policy = {question: log_policy for part in gathered for question, log_policy in part.items()}
        return policy

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["forklight_ref_log_policy"] = self.ref_log_policy

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.ref_log_policy = dict(checkpoint.get("forklight_ref_log_policy", {}))

    # ---- one step ---------------------------------------------------------------------------
    def sample_tags(self, old_log_policy: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Tag indices [B, G]: drawn from pi_old, or each tag G/N times (stratified)."""
        num_questions, num_tags = old_log_policy.shape
        group_size = self.hparams.group_size
        if self.hparams.tag_sampling == "stratified":
            return torch.arange(num_tags).repeat_interleave(group_size // num_tags).expand(num_questions, -1)
        generator = torch.Generator().manual_seed(self._sampling_seed(batch_idx))
        return torch.multinomial(old_log_policy.exp().cpu(), group_size, replacement=True, generator=generator)

    def prepare_update(self, batch, batch_idx: int) -> GFPOUpdate:
        old_log_policy = self.fork_policy_of(batch.prompt_ids)  # [B, N]
        tags = self.sample_tags(old_log_policy, batch_idx)  # [B, G]
        groups = self.rollouts(batch, tags.tolist(), batch_idx)
        rewards, valid = self.rewards(batch, groups)  # [B, G]
        self.log_rollouts(groups, rewards, valid)
        policy = old_log_policy.exp().mean(dim=0)  # [N]
        for tag, probability in enumerate(policy.tolist()):
            self.log(f"fork/policy/tag{tag + 1}", probability, batch_size=len(batch))
        self.log("fork/policy_entropy", categorical_entropy(old_log_policy).mean(), batch_size=len(batch))
        return GFPOUpdate(
            prompts=batch.prompt_ids, old_log_policy=old_log_policy, ref_log_policy=self.reference_policy(batch.ids),
            tags=tags.to(self.device), rewards=rewards.to(self.device), valid=valid.to(self.device),
            advantages=self.advantages(rewards, valid).to(self.device),
        )

    def reference_policy(self, question_ids: list[str]) -> torch.Tensor | None:
        """log pi_ref(. | x) of each question [B, N], computed when the fit started; None when kl_coef = 0."""
        if self.hparams.kl_coef == 0:
            return None
        missing = [question for question in question_ids if question not in self.ref_log_policy]
        if missing:
            raise KeyError(f"no reference tag policy for questions {missing[:3]}: they were not in the "
                           "training data when the fit started")
        return torch.stack([self.ref_log_policy[question] for question in question_ids]).to(self.device)

    def update_loss(self, update: GFPOUpdate, iteration: int, rows: slice | None = None) -> LossParts:
        hp = self.hparams
        with without_dropout(self.model):  # as pi_old (fork_policy_of, eval mode): the first ratio is exactly 1
            log_policy = fork_log_policy(self.model, update.prompts, self.fork_token_ids, self.tokenizer.pad_token_id)  # [B, N]
        if hp.tag_sampling == "stratified":
            num_tags = log_policy.shape[1]
            one_hot = torch.nn.functional.one_hot(update.tags, num_tags).float()  # [B, G, N]
            weights = one_hot * update.valid.unsqueeze(-1).float()  # [B, G, N]
            counts = weights.sum(dim=1)  # [B, N]
            tag_rewards = (weights * update.rewards.unsqueeze(-1)).sum(dim=1) / counts.clamp_min(1.0)  # [B, N]
            return stratified_gfpo_loss(log_policy, update.ref_log_policy, tag_rewards, counts > 0, hp.kl_coef, hp.entropy_coef)
        return gfpo_loss(
            log_policy, update.old_log_policy, update.ref_log_policy, update.tags, update.advantages, update.valid,
            hp.clip_eps, hp.kl_coef, hp.entropy_coef,
        )
