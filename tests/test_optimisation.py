"""Which weights decay, and the learning-rate schedule (forklight.optimisation)."""

from __future__ import annotations

import pytest
import torch

from forklight.optimisation import parameter_groups, warmup_cosine


def test_matrices_decay_by_name_under_sharding_and_fork_row_deltas_never():
    weights = {
        "_fsdp_wrapped_module.layer.weight": torch.nn.Parameter(torch.zeros(6)),  # a flattened matrix shard
        "layer.bias": torch.nn.Parameter(torch.zeros(3)),
        "embed.trainable_tokens_delta.default": torch.nn.Parameter(torch.zeros(2, 3)),
        "frozen.weight": torch.nn.Parameter(torch.zeros(2, 3), requires_grad=False),
    }
    decay, no_decay = parameter_groups(weights.items(), {"layer.weight", "embed.trainable_tokens_delta.default"}, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(weights["_fsdp_wrapped_module.layer.weight"])]
    assert {id(p) for p in no_decay["params"]} == {id(weights["layer.bias"]),
                                                    id(weights["embed.trainable_tokens_delta.default"])}
    by_shape, _ = parameter_groups(weights.items(), None, 0.1)  # before sharding: by shape
    assert len(by_shape["params"]) == 0  # the only 2-D trainable one is a fork-row delta


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=14, min_lr_ratio=0.1) for step in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0) and factors[9] == pytest.approx(0.55)
    assert factors[14:] == pytest.approx([0.1] * 6)
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
