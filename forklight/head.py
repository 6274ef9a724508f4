"""Losses from hidden states: the LM head runs only on the positions that are scored, a chunk at a time.

A causal LM's training loss needs ``log softmax(head(h_t))[y_t]`` at the scored positions only, yet the
model's forward builds the logits of every position, ``[R, T, V]``: at T = 16k, four traces and a 152k
vocabulary that is ~10^10 float32 values, more memory than the model. Here the forward runs without its
head (:func:`hidden_states`: the output embedding module swapped for ``Identity`` during the call, so the
model's ``.logits`` are the final hidden states ``[R, T, D]``), the scored positions are gathered
(``[K, D]``), and :func:`head_nll` applies the head to ``chunk_tokens`` of them at a time, each chunk
recomputed in backward (``torch.utils.checkpoint``): a chunk's ``[chunk, V]`` logits are the only ones alive,
in the forward and in the backward. The log-normaliser is computed in float32 whatever the logits' dtype.
The SSFT/SFT loss is a sum: with a plain ``nn.Linear`` head it is fused instead (:func:`head_nll_sum`,
:class:`_LinearNLLSum`): each chunk's gradients are computed in the forward, so nothing is recomputed.

``model.init_args.loss_head`` (:data:`HEAD_MODES`):

- ``chunked`` (default): the above, pure PyTorch, on every device; the head is called as a module, so
  LoRA heads and peft's trainable fork-token rows work unchanged, as does FSDP2 (the root's parameters,
  the head's among them, stay gathered from the forward to the backward);
- ``liger``: Liger's fused linear cross-entropy (``pip install liger-kernel``, CUDA only) for the SSFT/SFT
  loss; the chunked path for the rest. Needs a plain ``nn.Linear`` head; refused elsewhere, with why;
- ``auto``: ``liger`` where it can run, else ``chunked``;
- ``full``: the model's own logits (the path before this module; for comparison).

A model whose logits are not just its head applied to the last hidden states (Gemma-2's logit soft-capping,
Cohere's logit scale, ...) is detected once on a tiny input (:func:`probe_head`): its losses use ``full``
logits, with a warning saying why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from forklight.errors import ConfigError

HEAD_MODES = ("auto", "chunked", "liger", "full")
log = logging.getLogger(__name__)


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside ``model`` (a peft model's base model; the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def head_removed(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block ``model``'s output embeddings are ``Identity`` (its ``.logits`` are the final hidden
    states); yields the head module, put back on exit."""
    base = hf_model(model)
    head = base.get_output_embeddings()
    base.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        base.set_output_embeddings(head)


def hidden_states(model: nn.Module, **inputs) -> tuple[torch.Tensor, nn.Module]:
    """(final hidden states [R, T, D], the head module) of one forward without the head (``use_cache=False``)."""
    with head_removed(model) as head:
        hidden = model(**inputs, use_cache=False).logits  # [R, T, D]
    return hidden, head


def _chunk_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """[c] NLL of ``targets`` under ``softmax(head(hidden) / temperature)``, the normaliser in float32."""
    logits = head(hidden).float()  # [c, V]
    if temperature != 1.0:
        logits = logits / temperature
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)  # [c]


def head_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 512,
             temperature: float = 1.0) -> torch.Tensor:
    """NLL of each scored position, [K]: ``-log softmax(head(hidden[k]) / temperature)[targets[k]]``.

    hidden: [K, D] final hidden states of the scored positions; targets: [K]. ``chunk_tokens`` positions at a
    time; with autograd on, each chunk's logits are recomputed in backward instead of kept.
    """
    targets = targets.to(hidden.device)
    grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        chunk, chunk_targets = hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        if grad:
            pieces.append(checkpoint(_chunk_nll, head, chunk, chunk_targets, temperature, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(head, chunk, chunk_targets, temperature))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


class _LinearNLLSum(torch.autograd.Function):
    """``sum_k -log softmax((hidden[k] @ weight^T + bias) / temperature)[targets[k]]`` with its gradients computed
    in the forward, a chunk of positions at a time (Liger's fused linear cross-entropy, in PyTorch).

    Each chunk's ``[c, V]`` logits become its softmax in place and then the gradient of its logits
    (``softmax - onehot``), which the head's two gradient matmuls consume at once: the head runs three
    matmuls per chunk, as a full-logits loss does, and no chunk is recomputed in backward, which only
    scales the kept gradients (``[K, D]`` for the hidden states, ``[V, D]`` float32 for the weight) by the
    incoming scalar. Valid because the output is a sum: every position's upstream gradient is the same.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens, temperature, needs):
        # hidden: [K, D]; weight: [V, D]; bias: [V] or None; targets: [K]; needs: grads of (hidden, weight, bias)
        device_type = hidden.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype
        need_hidden, need_weight, need_bias = needs
        with torch.autocast(device_type, enabled=False):  # the matmul dtype is autocast's, chosen once here
            w = weight.to(dtype)  # [V, D]
            b = bias.to(dtype) if bias is not None else None  # [V]
            grad_hidden = torch.zeros_like(hidden) if need_hidden else None  # [K, D]
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
            grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_tokens):
                h = hidden[start : start + chunk_tokens].to(dtype)  # [c, D]
                t = targets[start : start + chunk_tokens]  # [c]
                logits = F.linear(h, w, b).float()  # [c, V]
                if temperature != 1.0:
                    logits /= temperature
                normaliser = torch.logsumexp(logits, dim=-1)  # [c]
                total += (normaliser - logits.gather(-1, t[:, None]).squeeze(-1)).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad_logits = logits.sub_(normaliser[:, None]).exp_()  # softmax, [c, V]
                grad_logits[torch.arange(len(t), device=t.device), t] -= 1.0  # d NLL / d logits
                if temperature != 1.0:
                    grad_logits /= temperature
                if need_bias:
                    grad_bias += grad_logits.sum(0)
                g = grad_logits.to(dtype)  # [c, V]
                if need_hidden:
                    grad_hidden[start : start + chunk_tokens] = (g @ w).to(hidden.dtype)  # [c, D]
                if need_weight:
                    grad_weight += (g.T @ h).float()  # [V, D]
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grads = [None if g is None else (g * grad_total).to(dtype) for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)]
        return (*grads, None, None, None, None)


def fused_nll_sum(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 512,
                  temperature: float = 1.0) -> torch.Tensor:
    """Sum of the NLL of ``targets`` [K] after ``hidden`` [K, D] under a plain linear ``head``, the gradients
    computed in the forward (:class:`_LinearNLLSum`); the log-normaliser in float32."""
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and head.weight.requires_grad,
             grad and head.bias is not None and head.bias.requires_grad)
    return _LinearNLLSum.apply(hidden, head.weight, head.bias, targets.to(hidden.device), chunk_tokens, temperature,
                               needs)


def head_nll_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = 512,
                 temperature: float = 1.0) -> torch.Tensor:
    """Sum of :func:`head_nll`: fused (:func:`fused_nll_sum`) when the head is a plain ``nn.Linear`` (FSDP2's
    subclass included), else the checkpointed chunks (a LoRA or trainable-token head is called as a module)."""
    if isinstance(head, nn.Linear):
        return fused_nll_sum(head, hidden, targets, chunk_tokens, temperature)
    return head_nll(head, hidden, targets, chunk_tokens, temperature).sum()


def liger_nll_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of the NLL of ``targets`` [K] after ``hidden`` [K, D], by Liger's fused linear cross-entropy
    (the log-normaliser accumulated in float32; no ``[K, V]`` logits kept)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(hidden, head.weight, targets.to(hidden.device), head.bias,
                                            reduction="sum", accum_dtype=torch.float32)


@dataclass(frozen=True)
class HeadPath:
    """How a module's losses reach the head (:func:`resolve_head`)."""

    chunked: bool  # losses from hidden states (False: the model's full logits)
    liger: bool  # the SSFT/SFT loss through Liger's fused kernel
    reason: str = ""  # why the asked-for path is not taken ("" when it is)


def liger_unavailable(model: nn.Module, device: torch.device) -> str:
    """Why Liger's fused loss cannot run for ``model`` on ``device`` ("" when it can)."""
    if device.type != "cuda":
        return f"it runs on CUDA only, and the model is on {device.type}"
    try:
        import liger_kernel.transformers.functional  # noqa: F401
    except Exception as error:  # not installed, or no triton
        return f"liger-kernel does not import here ({error!r}): pip install liger-kernel"
    head = hf_model(model).get_output_embeddings()
    if type(head) is not nn.Linear:
        return f"its head is a {type(head).__name__}, not a plain nn.Linear (e.g. a LoRA or trainable-token head)"
    return ""


@torch.no_grad()
def probe_head(model: nn.Module) -> str:
    """Why the model's logits are *not* its head on its final hidden states ("" when they are), on a tiny input."""
    base = hf_model(model)
    if not hasattr(base, "set_output_embeddings") or base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output embeddings to run separately"
    ids = torch.tensor([[1, 2, 3]], device=next(model.parameters()).device)  # [1, 3]
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits.float()  # [1, 3, V]
        hidden, head = hidden_states(model, input_ids=ids)  # [1, 3, D]
        recomputed = head(hidden).float()  # [1, 3, V]
    except Exception as error:  # noqa: BLE001 (a model whose forward needs its head)
        return f"its forward fails without its head ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    if recomputed.shape != logits.shape or not torch.allclose(recomputed, logits, rtol=1e-4, atol=1e-4):
        return "its logits are not its head applied to its last hidden states (e.g. logit soft-capping or scaling)"
    return ""


def resolve_head(mode: str, model: nn.Module) -> HeadPath:
    """The path of ``model.init_args.loss_head`` = ``mode`` for ``model`` (probed once per module)."""
    if mode not in HEAD_MODES:
        raise ConfigError(f"model.init_args.loss_head must be one of {HEAD_MODES}, got {mode!r}")
    if mode == "full":
        return HeadPath(chunked=False, liger=False)
    device = next(model.parameters()).device
    if mode == "liger":
        why = liger_unavailable(model, device)
        if why:
            raise ConfigError(f"model.init_args.loss_head=liger cannot run: {why}; use loss_head: chunked (the "
                              f"same losses in pure PyTorch) or auto")
    why = probe_head(model)
    if why:
        return HeadPath(chunked=False, liger=False, reason=f"losses use the model's full logits: {why}")
    return HeadPath(chunked=True, liger=mode == "liger" or (mode == "auto" and not liger_unavailable(model, device)))


def scored_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [K], positions [K]) of the positions whose next token is supervised, in row-major order:
    position t of row r predicts ``labels[r, t + 1]``. labels: [R, T] (HF convention, ignored = -100)."""
    from forklight.data.rendering import IGNORE_INDEX

    rows, positions = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)  # [K], [K]
    return rows, positions


def labels_nll(model: nn.Module, path: HeadPath, labels: torch.Tensor, chunk_tokens: int, temperature: float = 1.0,
               **inputs) -> torch.Tensor:
    """NLL of every supervised token of ``labels`` [R, T] (-100 = ignored), [K] in row-major order, from one
    forward of ``model`` on ``inputs`` (``input_ids`` [R, T], ...): from hidden states when ``path.chunked``,
    else from the full logits (:func:`forklight.losses.token_nll`)."""
    from forklight.losses import token_nll

    rows, positions = scored_positions(labels)
    if not path.chunked:
        logits = model(**inputs, use_cache=False).logits  # [R, T, V]
        return token_nll(logits, labels, temperature)[rows, positions]
    hidden, head = hidden_states(model, **inputs)  # [R, T, D]
    return head_nll(head, hidden[rows, positions], labels[rows, positions + 1], chunk_tokens, temperature)


def check_chunk_tokens(value: int, key: str = "model.init_args.loss_chunk_tokens") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be an int >= 1 (positions whose logits are alive at once), got {value!r}")
