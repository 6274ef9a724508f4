"""Generation engine: batched sampling of completions after a given (prompt + tag) prefix.

All prefixes of a call are generated in as few ``generate`` calls as ``batch_size`` allows, with
left padding and the KV cache; the tag is placed by forklight, never left to the sampler.
Generation keeps no autograd state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from forklight.data.rendering import left_padded_prompts


@dataclass
class Completion:
    """One sampled completion (the tokens after the prefix, up to and excluding the stop token)."""

    token_ids: list[int]
    text: str
    length: int  # generated tokens, stop token included when present
    truncated: bool  # hit max_new_tokens without a stop token


@torch.no_grad()
def generate_completions(
    model,
    tokenizer,
    prefixes: Sequence[Sequence[int]],
    stop_ids: Sequence[int],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 256,
) -> list[Completion]:
    """Sample one completion per prefix (prefix = prompt ids + tag id). Order is preserved."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None,
        top_k=None,
        eos_token_id=list(stop_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    device = next(model.parameters()).device
    order = sorted(range(len(prefixes)), key=lambda index: len(prefixes[index]))  # similar lengths together
    completions: list[Completion | None] = [None] * len(prefixes)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = left_padded_prompts([prefixes[i] for i in chunk], tokenizer.pad_token_id, device)
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
            generated = output[:, input_ids.shape[1] :].tolist()  # [R, <=max_new_tokens]
            for index, tokens in zip(chunk, generated):
                stop_at = next((t for t, token in enumerate(tokens) if token in stop_ids), None)
                kept = tokens if stop_at is None else tokens[:stop_at]
                completions[index] = Completion(
                    token_ids=kept,
                    text=tokenizer.decode(kept, skip_special_tokens=True),
                    length=len(kept) + (0 if stop_at is None else 1),
                    truncated=stop_at is None,
                )
    finally:
        model.train(was_training)
    return completions  # type: ignore[return-value]
