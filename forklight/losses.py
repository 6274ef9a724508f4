"""Losses as pure functions (DESIGN.md §1). Shapes: R rows, T positions, V vocabulary."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from forklight.data.rendering import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Next-token negative log-likelihood per position; 0 where the label is ignored.

    logits: [R, T, V] from the model on ``input_ids``; labels: [R, T] aligned with
    ``input_ids`` (HF convention: the shift happens here). Returns [R, T-1]. ``temperature``:
    of the distribution ``softmax(logits / temperature)`` (in float32), as sampling at that temperature.
    """
    shifted_logits = logits[:, :-1, :]  # [R, T-1, V] predicts position t+1
    shifted_labels = labels[:, 1:]  # [R, T-1]
    flat_logits = shifted_logits.reshape(-1, shifted_logits.shape[-1]).float()  # [R*(T-1), V]
    nll = F.cross_entropy(
        flat_logits / temperature if temperature != 1.0 else flat_logits,
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(shifted_labels.shape)  # [R, T-1]


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """[R, T-1] float mask of the positions :func:`token_nll` supervises."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def scored_token_nll(
    logits: torch.Tensor,
    rows: torch.Tensor,
    positions: torch.Tensor,
    targets: torch.Tensor,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """NLL of each scored token, [K]: ``-log softmax(logits[rows[k], positions[k]])[targets[k]]``.

    Same values as ``F.cross_entropy(logits[rows, positions], targets)`` (computed in float32)
    without its [K, V] copy and log-probabilities: the log-normaliser of each distinct scored
    (row, position) is computed once, a block of about ``block_bytes`` of float32 logits at a time
    (default: 8 MiB on CPU, cache-sized; 256 MiB on an accelerator), and the target logit is
    gathered. Scored tokens may share a position (rows shared by several traces).
    logits: [R, T, V]; rows, positions, targets: [K].
    """
    device = logits.device
    if block_bytes is None:
        block_bytes = 1 << 23 if device.type == "cpu" else 1 << 28
    num_positions, vocab = logits.shape[1], logits.shape[2]
    flat_logits = logits.reshape(-1, vocab)  # [R*T, V]
    flat = rows.to(device) * num_positions + positions.to(device)  # [K]
    distinct, inverse = torch.unique(flat, return_inverse=True)  # [U], [K]
    normaliser = torch.empty(len(distinct), device=device)  # [U] log sum exp of each scored position
    block = max(1, block_bytes // (4 * vocab))
    for start in range(0, len(distinct), block):
        chunk = flat_logits.index_select(0, distinct[start : start + block]).float()  # [b, V]
        normaliser[start : start + block] = chunk[:, 0] - F.log_softmax(chunk, dim=-1)[:, 0]
    return normaliser[inverse] - flat_logits[flat, targets.to(device)].float()


def group_means(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values[k]`` over each group ``groups[k]``, [num_groups] (0 for an empty group)."""
    groups = groups.to(values.device)
    sums = torch.zeros(num_groups, device=values.device, dtype=values.dtype).index_add_(0, groups, values)
    counts = torch.bincount(groups, minlength=num_groups).clamp_min(1)
    return sums / counts


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL over all supervised tokens, number of supervised tokens), both scalars.

    The SSFT/SFT loss is ``sum / num_tokens`` with the token count of the whole (global)
    batch, so long traces weigh by their length and chunking does not change the loss.
    """
    nll = token_nll(logits, labels)  # [R, T-1]
    mask = supervised_mask(labels)  # [R, T-1]
    return (nll * mask).sum(), mask.sum()


def data_parallel_token_mean(nll_sum: torch.Tensor, global_tokens: torch.Tensor, world_size: int) -> torch.Tensor:
    """This rank's part of the global token mean ``sum_ranks nll_sum / global_tokens``, times ``world_size``.

    DDP and FSDP average gradients over the ranks, so the averaged gradient is the gradient of the
    global mean: R processes with batch b train exactly like one process with batch R*b.
    ``global_tokens``: supervised tokens of all ranks' batches; with one process this is ``sum / tokens``.
    """
    return nll_sum * world_size / global_tokens.clamp_min(1.0)


# Gradient accumulation (``trainer.accumulate_grad_batches`` = K): the step's loss is the token mean over the
# whole window, ``sum_{k, ranks} nll / sum_{k, ranks} tokens``, but the window's tokens are only known after its
# last micro-batch. Each micro-batch therefore backpropagates its nll over a constant fixed when the window opens
# (``reference_tokens``: the global tokens of its first micro-batch), and the summed gradients are multiplied by
# :func:`accumulation_correction` before gradient clipping and the step: exact, with no look-ahead.
@dataclass
class TokenWindow:
    """The micro-batches of one optimiser step so far; token counts are global (all data-parallel ranks)."""

    reference_tokens: float  # supervised tokens of the first micro-batch: what every micro-batch is divided by
    tokens: float = 0.0  # supervised tokens of the micro-batches that took a backward (skipped ones excluded)
    weighted_loss: torch.Tensor | float = 0.0  # sum of micro-batch token mean x tokens: world_size x this rank's nll

    def add(self, micro_batch_mean: torch.Tensor, micro_batch_tokens: float) -> torch.Tensor:
        """Count one micro-batch; returns the window's token mean so far (this rank's part, as the micro-batch mean)."""
        self.tokens += micro_batch_tokens
        self.weighted_loss = self.weighted_loss + micro_batch_mean.detach() * micro_batch_tokens
        return self.weighted_loss / max(self.tokens, 1.0)


def window_token_mean_part(micro_batch_mean: torch.Tensor, micro_batch_tokens: float, reference_tokens: float,
                           accumulate_grad_batches: int) -> torch.Tensor:
    """This rank's micro-batch part of the window's token mean, up to :func:`accumulation_correction`.

    ``micro_batch_mean``: :func:`data_parallel_token_mean` of the micro-batch, ``nll_sum * world_size / tokens``.
    Returns ``nll_sum * world_size * K / reference_tokens``: DDP's mean over the ranks and Lightning's division
    by K (``accumulate_grad_batches``, also applied to a short last window) leave ``nll_sum / reference_tokens``.
    """
    return micro_batch_mean * (max(micro_batch_tokens, 1.0) * accumulate_grad_batches / max(reference_tokens, 1.0))


def accumulation_correction(reference_tokens: float, window_tokens: float) -> float:
    """Factor of the accumulated gradients that turns ``sum nll / reference_tokens`` into the window's token
    mean ``sum nll / window_tokens`` (both counts global: all ranks, all micro-batches of the step)."""
    return max(reference_tokens, 1.0) / max(window_tokens, 1.0)


# ---- RL (GFPO, GRPO): B questions, G samples per question, N fork tokens, L completion tokens ----


@dataclass
class LossParts:
    """An RL loss and the parts that are logged (``train/kl``, ...); a part the loss does not have is None."""

    loss: torch.Tensor  # [] what is backpropagated (with gradient)
    kl: torch.Tensor | None = None  # [] KL to the reference policy (0 without one)
    clip_frac: torch.Tensor | None = None  # [] share of clipped ratios (GFPO: samples; GRPO: tokens)
    surrogate: torch.Tensor | None = None  # [] the policy-gradient term alone (GFPO)
    entropy: torch.Tensor | None = None  # [] entropy of the tag policy (GFPO)
    tokens: torch.Tensor | None = None  # [] supervised tokens of the rows given (GRPO: weights merge_chunk_parts)

    def detached(self) -> LossParts:
        """The same parts without gradient."""
        return LossParts(**{name: None if value is None else value.detach() for name, value in vars(self).items()})


def group_advantages(rewards: torch.Tensor, valid: torch.Tensor, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """``A_k = (r_k - mean r) / (std r + eps)`` within each question's group, [B, G].

    rewards, valid: [B, G] (``valid`` False where the verifier skipped a sample: no advantage).
    ``scale="none"`` keeps ``r_k - mean r`` (Dr. GRPO). A group with one valid sample gets 0.
    """
    if scale not in ("group", "none"):
        raise ValueError(f"scale_rewards must be 'group' or 'none', got {scale!r}")
    weights = valid.float()  # [B, G]
    count = weights.sum(dim=1, keepdim=True).clamp_min(1.0)  # [B, 1]
    mean = (rewards * weights).sum(dim=1, keepdim=True) / count  # [B, 1]
    centred = (rewards - mean) * weights  # [B, G]
    if scale == "group":
        variance = (centred**2).sum(dim=1, keepdim=True) / (count - 1).clamp_min(1.0)  # unbiased, like torch.std
        centred = centred / (variance.sqrt() + eps)
    return centred


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's per-sample objective ``-min(rho A, clip(rho, 1 +- eps) A)`` and whether it clipped.

    log_ratio, advantages: same shape (any). Returns (loss, clipped mask), same shape.
    """
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped)


def categorical_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(p || q)`` over the last dimension (the N fork tokens), [...]."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def categorical_entropy(log_p: torch.Tensor) -> torch.Tensor:
    """Entropy over the last dimension, [...]."""
    return -(log_p.exp() * log_p).sum(dim=-1)


def gfpo_loss(
    log_policy: torch.Tensor,
    old_log_policy: torch.Tensor,
    ref_log_policy: torch.Tensor | None,
    tags: torch.Tensor,
    advantages: torch.Tensor,
    valid: torch.Tensor,
    clip_eps: float,
    kl_coef: float,
    entropy_coef: float,
) -> LossParts:
    """GFPO objective over the fork-token policy (DESIGN.md §1), sampled-tag form.

    log_policy: [B, N] log pi_theta(.|x) with gradient; old_log_policy, ref_log_policy: [B, N];
    tags: [B, G] sampled tag indices; advantages, valid: [B, G].
    Returns the loss and its parts (surrogate, kl, entropy, clip_frac).
    """
    new = log_policy.gather(1, tags)  # [B, G]
    old = old_log_policy.gather(1, tags)  # [B, G]
    per_sample, clipped = clipped_surrogate(new - old, advantages, clip_eps)  # [B, G]
    weights = valid.float()
    count = weights.sum().clamp_min(1.0)
    surrogate = (per_sample * weights).sum() / count
    return _with_regularisers(surrogate, log_policy, ref_log_policy, kl_coef, entropy_coef, (clipped.float() * weights).sum() / count)


def stratified_gfpo_loss(
    log_policy: torch.Tensor,
    ref_log_policy: torch.Tensor | None,
    tag_rewards: torch.Tensor,
    tag_valid: torch.Tensor,
    kl_coef: float,
    entropy_coef: float,
) -> LossParts:
    """GFPO objective with stratified tags: ``-sum_i pi_theta(i|x) (r_i - mean r)``, averaged over x.

    log_policy: [B, N] with gradient; tag_rewards: [B, N] mean reward of each tag's samples;
    tag_valid: [B, N] (False where a tag has no scored sample: it gets no advantage). The
    gradient equals the exact policy gradient of the expected reward under ``pi_theta``.
    """
    weights = tag_valid.float()  # [B, N]
    mean = (tag_rewards * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    advantages = (tag_rewards - mean) * weights  # [B, N]
    surrogate = -(log_policy.exp() * advantages).sum(dim=1).mean()
    return _with_regularisers(surrogate, log_policy, ref_log_policy, kl_coef, entropy_coef, torch.zeros(()))


def _with_regularisers(surrogate, log_policy, ref_log_policy, kl_coef, entropy_coef, clip_frac) -> LossParts:
    kl = categorical_kl(log_policy, ref_log_policy).mean() if ref_log_policy is not None else torch.zeros(())
    entropy = categorical_entropy(log_policy).mean()
    loss = surrogate + kl_coef * kl - entropy_coef * entropy
    return LossParts(loss=loss, surrogate=surrogate.detach(), kl=kl.detach(), entropy=entropy.detach(),
                     clip_frac=clip_frac.detach())


GRPO_LOSS_TYPES = ("grpo", "dapo", "dr_grpo")


def k3_kl(log_p: torch.Tensor, ref_log_p: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of ``KL(p || ref)`` on tokens sampled from p: ``e^d - d - 1``, d = ref - p."""
    delta = ref_log_p - log_p
    return torch.exp(delta) - delta - 1.0


def grpo_normaliser(mask: torch.Tensor, loss_type: str, max_completion_length: int) -> torch.Tensor:
    """This rank's denominator of the GRPO loss: sequences (``grpo``), supervised tokens (``dapo``)
    or sequences * ``max_completion_length`` (``dr_grpo``); mask: [S, L]. A scalar tensor."""
    if loss_type == "grpo":
        return torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss_type == "dapo":
        return mask.float().sum()
    return torch.tensor(float(mask.shape[0] * max_completion_length), device=mask.device)


def grpo_loss(
    token_log_probs: torch.Tensor,
    old_token_log_probs: torch.Tensor,
    ref_token_log_probs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str,
    clip_eps: float,
    kl_coef: float,
    max_completion_length: int,
    global_count: torch.Tensor | None = None,
    world_size: int = 1,
) -> LossParts:
    """Token-level GRPO objective over completions.

    token_log_probs: [S, L] log pi_theta of each completion token with gradient; old/ref: [S, L];
    advantages: [S] (one per completion); mask: [S, L] 1 on completion tokens (stop token included).
    Normalisation by ``loss_type``: ``grpo`` mean over each sequence's tokens then over sequences;
    ``dapo`` sum over all tokens / all tokens; ``dr_grpo`` sum / (S * max_completion_length).
    Data parallel: pass ``global_count`` (:func:`grpo_normaliser` summed over the ranks) and
    ``world_size``; with the ranks' gradients averaged, R processes then train like one process
    with all R batches (the default is this rank's own count). The numerator is a sum over
    sequences, so a chunk of the rows with the whole batch's ``global_count`` gives that chunk's
    share: the chunks' losses (and gradients) add up to the batch's (micro-batched update).
    Returns loss, kl and clip_frac (token means of the rows given) and their supervised tokens.
    """
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"model.loss_type must be one of {GRPO_LOSS_TYPES}, got {loss_type!r}")
    mask = mask.float()
    per_token, clipped = clipped_surrogate(token_log_probs - old_token_log_probs, advantages.unsqueeze(1), clip_eps)  # [S, L]
    kl = k3_kl(token_log_probs, ref_token_log_probs) if ref_token_log_probs is not None else torch.zeros_like(per_token)
    per_token = per_token + kl_coef * kl
    if loss_type == "grpo":
        local_sum = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)).sum()  # sum of sequence means
    else:
        local_sum = (per_token * mask).sum()
    count = global_count if global_count is not None else grpo_normaliser(mask, loss_type, max_completion_length)
    loss = local_sum * world_size / count.clamp_min(1.0)
    tokens = mask.sum().clamp_min(1.0)
    return LossParts(loss=loss, kl=((kl * mask).sum() / tokens).detach(),
                     clip_frac=((clipped.float() * mask).sum() / tokens).detach(), tokens=mask.sum().detach())


def merge_chunk_parts(chunks: list[LossParts]) -> LossParts:
    """Loss parts of a batch from those of its row chunks (a micro-batched update): ``loss`` summed (each
    chunk's loss is divided by the whole batch's denominator, :func:`grpo_loss` ``global_count``); the
    token means (``kl``, ``clip_frac``) weighted by each chunk's ``tokens``. One chunk: its parts."""
    if len(chunks) == 1:
        return chunks[0]
    tokens = torch.stack([chunk.tokens for chunk in chunks])  # [C]
    weights = tokens / tokens.sum().clamp_min(1.0)  # [C]

    def token_mean(name: str) -> torch.Tensor | None:
        values = [getattr(chunk, name) for chunk in chunks]
        return None if values[0] is None else (torch.stack(values) * weights).sum()

    return LossParts(loss=torch.stack([chunk.loss for chunk in chunks]).sum(), tokens=tokens.sum(),
                     **{name: token_mean(name) for name in ("surrogate", "kl", "entropy", "clip_frac")})
