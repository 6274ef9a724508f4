"""The optimiser's pure parts: which weights decay, and the learning-rate schedule.

:class:`~forklight.modules.base.ForkModule` builds AdamW and a ``LambdaLR`` from these; they take
names, shapes and step counts, so they are tested without a model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def parameter_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], matrix_names: set[str] | None,
                     weight_decay: float) -> list[dict]:
    """AdamW groups of the trainable parameters: matrices decay by ``weight_decay``, the rest do not.

    FSDP flattens parameters into 1-D shards, so a matrix is told by its name (wrapper prefixes removed)
    from ``matrix_names``, the names of the ≥2-D weights seen before sharding (None: by shape). A LoRA
    run's fork-token rows (peft's ``trainable_tokens_delta``) are deltas on pretrained rows: no decay.
    """
    decay, no_decay = [], []
    for name, parameter in named_parameters:
        if not parameter.requires_grad:
            continue
        for prefix in WRAPPER_PREFIXES:
            name = name.replace(prefix, "")
        is_matrix = name in matrix_names if matrix_names is not None else parameter.ndim >= 2
        (decay if is_matrix and "trainable_tokens_delta" not in name else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning-rate factor at ``step``: linear warm-up over ``warmup_steps``, then cosine from 1 down to
    ``min_lr_ratio`` at ``total_steps`` (held there after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
