"""Forking tokens ``<think1>..<thinkN>``: add them to a tokenizer and a model, and find their ids.

DESIGN.md §1: the new input and output embedding rows start at the mean of the existing rows
plus a small seeded perturbation. Identical rows would make every row of the SSFT cost
matrix equal, so the matching could never break the tie between tags.
"""

from __future__ import annotations

import torch


def fork_token_names(num_fork_tokens: int, name_format: str = "<think{i}>") -> list[str]:
    """``["<think1>", ..., "<thinkN>"]`` (``name_format`` takes the 1-based index ``{i}``)."""
    if num_fork_tokens < 1:
        raise ValueError(f"model.num_fork_tokens must be >= 1, got {num_fork_tokens}")
    if "{i}" not in name_format:
        raise ValueError(f"model.fork_token_format must contain '{{i}}', got {name_format!r}")
    names = [name_format.format(i=i + 1) for i in range(num_fork_tokens)]
    return names


def add_fork_tokens(tokenizer, names: list[str]) -> tuple[list[int], list[int]]:
    """Add ``names`` as special tokens; return (all fork ids, ids of the newly added ones).

    Names already present as special tokens (a forklight export) are reused, not re-added.
    """
    vocab = tokenizer.get_vocab()
    existing = [name for name in names if name in vocab]
    special = set(tokenizer.all_special_tokens) | {
        token.content for token in tokenizer.added_tokens_decoder.values() if token.special
    }
    collisions = [name for name in existing if name not in special]
    if collisions:
        raise ValueError(
            f"fork token names {collisions} already exist as ordinary tokens of the tokenizer; "
            "choose another model.fork_token_format (e.g. '<fork{i}>')"
        )
    missing = [name for name in names if name not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(names)
    for name, token_id in zip(names, ids):
        if tokenizer.convert_ids_to_tokens(token_id) != name or len(tokenizer(name, add_special_tokens=False)["input_ids"]) != 1:
            raise ValueError(f"fork token {name!r} does not map to a single token id; check model.fork_token_format")
    new_ids = [token_id for name, token_id in zip(names, ids) if name in missing]
    return list(ids), new_ids


@torch.no_grad()
def init_fork_embeddings(model, fork_token_ids: list[int], num_old_tokens: int, seed: int, noise_std: float) -> None:
    """Resize ``model`` to cover ``fork_token_ids`` and initialise their rows (mean + noise, :func:`fork_token_rows`).

    Other rows are left as they are. Input and output embeddings are initialised independently
    (the input's rows first, from one generator) unless they are tied (then the shared matrix once).
    """
    needed = max(fork_token_ids) + 1
    if model.get_input_embeddings().weight.shape[0] < needed:
        model.resize_token_embeddings(needed, mean_resizing=False)
    generator = torch.Generator().manual_seed(seed)
    matrices = [model.get_input_embeddings().weight]
    output = model.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != matrices[0].data_ptr():
        matrices.append(output.weight)
    for weight in matrices:
        weight[torch.tensor(fork_token_ids)] = fork_token_rows(weight, len(fork_token_ids), num_old_tokens, generator, noise_std)


@torch.no_grad()
def fork_token_rows(weight: torch.Tensor, num_rows: int, num_old_tokens: int, generator: torch.Generator,
                    noise_std: float) -> torch.Tensor:
    """New fork-token rows [N, D] of an embedding or output matrix ``weight`` [V, D], in its dtype: the mean of its
    first ``num_old_tokens`` rows (the tokenizer's vocabulary before the fork tokens) plus noise drawn from
    ``generator``, ``noise_std`` relative to the rows' standard deviation. A model built whole and a sharded one
    filled tensor by tensor (:mod:`forklight.sharded_weights`) both call it, so their rows are the same."""
    old_rows = weight[:num_old_tokens].float()  # [V_old, D]
    mean = old_rows.mean(dim=0)  # [D]
    scale = noise_std * old_rows.std(dim=0).mean().clamp_min(1e-6)
    noise = torch.randn(num_rows, weight.shape[1], generator=generator) * scale  # [N, D]
    return (mean.unsqueeze(0) + noise).to(weight.dtype)


def fork_log_policy(model, prompts, fork_token_ids: list[int], pad_id: int) -> torch.Tensor:
    """log pi(i | x) over the N fork tokens at the tag position (after each prompt), [B, N].

    ``prompts``: B sequences of token ids (the rendered prompt, generation prompt included).
    Left padding with positions counted from each row's first real token; only the last
    position's logits are computed. Gradient flows when the caller enables it (GFPO's update).
    """
    from forklight.data.rendering import left_padded_prompts

    device = next(model.parameters()).device
    input_ids, attention_mask = left_padded_prompts(prompts, pad_id, device)  # [B, T]
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp_min(0)  # [B, T]
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False
    ).logits[:, -1, :]  # [B, V]
    fork_logits = logits[:, torch.as_tensor(fork_token_ids, device=device)].float()  # [B, N]
    return torch.log_softmax(fork_logits, dim=-1)
