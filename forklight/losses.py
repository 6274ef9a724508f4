"""Losses as pure functions (DESIGN.md §1). Shapes: R rows, T positions, V vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from forklight.data.rendering import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token negative log-likelihood per position; 0 where the label is ignored.

    logits: [R, T, V] from the model on ``input_ids``; labels: [R, T] aligned with
    ``input_ids`` (HF convention: the shift happens here). Returns [R, T-1].
    """
    shifted_logits = logits[:, :-1, :]  # [R, T-1, V] predicts position t+1
    shifted_labels = labels[:, 1:]  # [R, T-1]
    nll = F.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]).float(),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return nll.view(shifted_labels.shape)  # [R, T-1]


def supervised_mask(labels: torch.Tensor) -> torch.Tensor:
    """[R, T-1] float mask of the positions :func:`token_nll` supervises."""
    return (labels[:, 1:] != IGNORE_INDEX).float()


def mean_row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL of each row over its supervised tokens, [R] (the SSFT matching cost C[i, j])."""
    nll = token_nll(logits, labels)  # [R, T-1]
    mask = supervised_mask(labels)  # [R, T-1]
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL over all supervised tokens, number of supervised tokens), both scalars.

    The SSFT/SFT loss is ``sum / num_tokens`` with the token count of the whole (global)
    batch, so long traces weigh by their length and chunking does not change the loss.
    """
    nll = token_nll(logits, labels)  # [R, T-1]
    mask = supervised_mask(labels)  # [R, T-1]
    return (nll * mask).sum(), mask.sum()
