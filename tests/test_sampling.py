"""Sampling is exactly what forklight's options say, whatever generation config a checkpoint ships."""

from __future__ import annotations

import numpy as np
import torch

from forklight.rollout import generate_completions


def test_a_checkpoints_generation_config_does_not_leak_into_sampling(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2)
    model, tokenizer = module.model.eval(), module.tokenizer
    # What e.g. Qwen2.5-Instruct's generation_config.json does to transformers' generate by default.
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.min_p = 0.2
    prefix = [int(t) for t in tokenizer("12+34=")["input_ids"]] + [module.fork_token_ids[0]]
    with torch.no_grad():
        probabilities = torch.softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1).numpy()  # [V]
    samples = 4000
    torch.manual_seed(0)
    completions = generate_completions(model, tokenizer, [prefix] * samples, stop_ids=[], max_new_tokens=1,
                                       temperature=1.0, top_p=1.0, batch_size=samples)
    counts = np.bincount([c.sampled_ids[0] for c in completions], minlength=len(probabilities)) / samples
    total_variation = 0.5 * np.abs(counts - probabilities).sum()
    assert (counts > 0).sum() > 3  # top_k 3 did not apply
    assert total_variation < 0.08, total_variation  # T=1, top_p=1: the model's own distribution
    assert model.generation_config.top_k == 3  # the checkpoint's config itself is left as it was


def test_greedy_is_the_argmax_whatever_the_checkpoint_says(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2)
    model, tokenizer = module.model.eval(), module.tokenizer
    model.generation_config.repetition_penalty = 100.0  # would forbid repeating any prompt token
    model.generation_config.do_sample = True
    prefix = [int(t) for t in tokenizer("11+11=")["input_ids"]] + [module.fork_token_ids[0]]
    completion = generate_completions(model, tokenizer, [prefix], stop_ids=[], max_new_tokens=6, temperature=0.0)[0]
    expected, ids = [], list(prefix)
    with torch.no_grad():
        for _ in range(6):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(token)
            ids.append(token)
    assert completion.token_ids == expected
