"""Generation engines: batched sampling of completions after given (prompt + tag) prefixes.

Every call site (evaluation, predict, GFPO and GRPO rollouts) samples through one protocol,
:class:`GenerationEngine`: ``engine.generate(prefixes, settings) -> list[Completion]``, with
token-id prefixes (the tag is placed by forklight, never left to the sampler) and every sampling
choice in :class:`SamplingSettings`, the seed included. ``model.engine`` picks the engine from
:data:`ENGINES`: ``hf`` (:class:`HFEngine`, transformers' ``generate`` on the training model, the
default), ``vllm`` (:class:`~forklight.vllm_engine.VLLMEngine`, optional: vLLM in this process on a
copy of the weights, synced after the optimiser steps that can change a completion) or ``vllm-server``
(:class:`~forklight.vllm_server.VLLMServerEngine`: running ``vllm serve`` endpoints, for runs whose
sampling weights never change). A new engine is
one class with that ``generate`` and an ``(model, tokenizer)`` constructor, added to :data:`ENGINES`
(:class:`ModuleEngine` says what an engine with options or a copy of the weights adds).

``HFEngine`` generates all prefixes of a call in as few ``generate`` calls as ``batch_size``
allows, with left padding and the KV cache, and keeps no autograd state.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from forklight.data.rendering import left_padded_prompts
from forklight.errors import ConfigError
from forklight.sharding import forward_is_collective


@dataclass
class Completion:
    """One sampled completion (the tokens after the prefix, up to and excluding the stop token)."""

    token_ids: list[int]
    text: str
    length: int  # generated tokens, stop token included when present
    truncated: bool  # hit max_new_tokens without a stop token
    stop_token: int | None = None  # the stop token that ended it (None when truncated)

    @property
    def sampled_ids(self) -> list[int]:
        """Every sampled token, the stop token included (what an RL loss scores)."""
        return self.token_ids + ([self.stop_token] if self.stop_token is not None else [])


@dataclass(frozen=True)
class SamplingSettings:
    """How an engine samples: everything it may use, and nothing else (no checkpoint defaults)."""

    temperature: float  # 0 = greedy
    top_p: float  # nucleus threshold (ignored when greedy)
    max_new_tokens: int
    stop_ids: Sequence[int]  # a completion ends at the first of these
    suppress_ids: Sequence[int] = ()  # never generated (forklight passes the fork tokens)
    seed: int | None = None  # seeds the engine's sampler for this call; None: the global RNG as it is
    batch_size: int = 256  # sequences per engine call (``model.generation_batch_size``)


Progress = Callable[[int, int], None]  # progress(done, total) in sequences, after each chunk


def callback_progress(trainer, module) -> Progress | None:
    """``progress(done, total)`` that calls ``on_generation_progress(trainer, module, done, total)`` of every
    trainer callback with that hook (e.g. ``callbacks.GenerationProgress``, which only observes); None without one."""
    observers = [c for c in trainer.callbacks if hasattr(c, "on_generation_progress")] if trainer is not None else []
    if not observers:
        return None

    def progress(done: int, total: int) -> None:
        for callback in observers:
            callback.on_generation_progress(trainer, module, done, total)

    return progress


class GenerationEngine(Protocol):
    """Samples one completion per prefix (prompt ids + tag id), in order."""

    def generate(self, prefixes: Sequence[Sequence[int]], settings: SamplingSettings,
                 progress: Progress | None = None) -> list[Completion]: ...


@dataclass
class RolloutGroup:
    """The G samples of one question: which tag each followed, and what it generated."""

    id: str
    prompt_ids: list[int]
    tags: list[int]  # [G] tag index (0-based) of each sample
    completions: list[Completion]  # [G]


class _FinishedRowPadFilter(logging.Filter):
    """``generate`` feeds finished rows their pad token, and GPT-2-style models then warn that no
    attention mask was passed although ``generate`` passes one; drop that one message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_FinishedRowPadFilter())


# Every logits processor that transformers' ``generate`` would otherwise fill in from the checkpoint's
# generation_config.json or its own global defaults (e.g. Qwen2.5-Instruct ships top_k 20 and
# repetition_penalty 1.05; an unset top_k becomes 50), set to its neutral value.
NEUTRAL_SAMPLING = {
    "top_k": 0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": None, "num_beams": 1,
    "bad_words_ids": None, "sequence_bias": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "begin_suppress_tokens": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "watermarking_config": None,
}


def sampling_config(max_new_tokens: int, temperature: float, top_p: float, stop_ids: Sequence[int], pad_id: int,
                    suppress_ids: Sequence[int] = ()):
    """The ``GenerationConfig`` that samples exactly as forklight's options say: temperature and top-p
    (greedy at temperature 0), the stop ids, the suppressed ids, and nothing else."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p if temperature > 0 else 1.0,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        suppress_tokens=list(suppress_ids) or None,
    )
    for key, value in NEUTRAL_SAMPLING.items():
        if key != "top_k" or temperature > 0:  # greedy has no top-k (and transformers warns about one)
            setattr(config, key, value)
    return config


@contextlib.contextmanager
def checkpoint_defaults_hidden(model):
    """While generating, every ``generation_config`` in ``model`` (a peft wrapper's base model too) is
    a blank one, so no field the checkpoint ships can fill a setting that forklight left unset."""
    from transformers import GenerationConfig

    saved = [(module, module.generation_config) for module in model.modules()
             if isinstance(getattr(module, "generation_config", None), GenerationConfig)]
    for module, _ in saved:
        module.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for module, config in saved:
            module.generation_config = config


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
    progress: Progress | None = None,
    suppress_ids: Sequence[int] = (),
) -> list[Completion]:
    """Sample one completion per prefix (prefix = prompt ids + tag id), in order: :class:`HFEngine`'s sampler.

    ``suppress_ids`` can never be generated (forklight passes the fork tokens: a completion
    never contains a tag, whatever a GFPO update did to their output rows).

    ``progress(done, total)``, if given, is called after each chunk of ``batch_size`` prefixes.
    A sharded model (FSDP2, FSDP) generates in step on every rank: a rank whose sequences have
    all stopped keeps running forward passes until every rank's have (``synced_gpus``), else the
    ranks still generating would wait for it forever. Ranks must pass equally many prefixes.
    """
    config = sampling_config(max_new_tokens, temperature, top_p, stop_ids, tokenizer.pad_token_id, suppress_ids)
    device = next(model.parameters()).device
    synced = forward_is_collective(model)
    order = sorted(range(len(prefixes)), key=lambda index: len(prefixes[index]))  # similar lengths together
    completions: list[Completion | None] = [None] * len(prefixes)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            input_ids, attention_mask = left_padded_prompts([prefixes[i] for i in chunk], tokenizer.pad_token_id, device)
            with checkpoint_defaults_hidden(model):
                output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                        synced_gpus=synced)
            generated = output[:, input_ids.shape[1] :].tolist()  # [R, <=max_new_tokens]
            for index, tokens in zip(chunk, generated):
                stop_at = next((t for t, token in enumerate(tokens) if token in stop_ids), None)
                kept = tokens if stop_at is None else tokens[:stop_at]
                completions[index] = Completion(
                    token_ids=kept,
                    text=tokenizer.decode(kept, skip_special_tokens=True),
                    length=len(kept) + (0 if stop_at is None else 1),
                    truncated=stop_at is None,
                    stop_token=None if stop_at is None else tokens[stop_at],
                )
            if progress is not None:
                progress(start + len(chunk), len(order))
    finally:
        model.train(was_training)
    return completions  # type: ignore[return-value]


class HFEngine:
    """transformers' ``generate`` on the training model itself (no copy, so no weight sync).

    Seeding: with ``settings.seed`` set, the call samples from ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng`` (the model's CUDA device included), so the global RNG state is the
    same after the call as before it. A sharded model (FSDP2, FSDP) generates in step on every rank
    (``synced_gpus``, see :func:`generate_completions`).
    """

    def __init__(self, model, tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    def generate(self, prefixes: Sequence[Sequence[int]], settings: SamplingSettings,
                 progress: Progress | None = None) -> list[Completion]:
        device = next(self.model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            return generate_completions(
                self.model, self.tokenizer, prefixes, settings.stop_ids, settings.max_new_tokens,
                settings.temperature, settings.top_p, settings.batch_size, progress=progress,
                suppress_ids=settings.suppress_ids,
            )


# model.engine -> an engine class, or "package.module:Class" of an optional one (imported when chosen)
ENGINES: dict[str, type | str] = {"hf": HFEngine, "vllm": "forklight.vllm_engine:VLLMEngine",
                                  "vllm-server": "forklight.vllm_server:VLLMServerEngine"}


def engine_class(name: str) -> type:
    """The engine class ``model.engine`` names; an unknown name is an error listing the choices. An optional
    engine is imported here, and its ``check_installed()`` (if any) raises an error saying what to install."""
    if name not in ENGINES:
        raise ValueError(f"model.engine must be one of {sorted(ENGINES)} (generation engines), got {name!r}")
    engine = ENGINES[name]
    if isinstance(engine, str):
        module, _, attribute = engine.partition(":")
        engine = getattr(importlib.import_module(module), attribute)
    if hasattr(engine, "check_installed"):
        engine.check_installed()
    return engine


class ModuleEngine:
    """A module's generation engine (``model.engine``), built around the training model on first use.

    An engine class with a ``settings_key`` is built as ``engine(model, tokenizer, options[settings_key])``
    (VLLMEngine: ``model.init_args.vllm``), any other as ``engine(model, tokenizer)``. An engine that samples
    from a copy of the weights has ``sync_weights(model)``: it reads them again before the first generation
    after an optimiser step that can change a completion (:meth:`weights_changed`); syncing lazily, once per
    generation and not once per step, costs nothing between steps that never generate. An engine class with
    ``supports_weight_sync = False`` cannot follow training: :meth:`check_fit` refuses it before a fit whose
    steps change completions.
    """

    def __init__(self, name: str, options: Mapping) -> None:
        self.name, self.options = name, options  # options: the module's hparams
        self.engine: GenerationEngine | None = None
        self.stale = False  # the training weights changed since the engine last read them

    def get(self, model, tokenizer) -> GenerationEngine:
        if getattr(self.engine, "closed", False):  # shut down by another engine of this process: build it again
            self.engine, self.stale = None, False
        if self.engine is None:
            engine = engine_class(self.name)
            key = getattr(engine, "settings_key", None)
            self.engine = engine(model, tokenizer) if key is None else engine(model, tokenizer, self.options.get(key))
        elif self.stale and hasattr(self.engine, "sync_weights"):
            self.engine.sync_weights(model)
        self.stale = False
        return self.engine

    def close(self) -> None:
        """Shut the engine down now, if it can be (VLLMEngine: frees its memory); the next ``get`` builds it again."""
        if self.engine is not None and hasattr(self.engine, "close"):
            self.engine.close()

    def check_fit(self, changes_completions: bool) -> None:
        """Before fit: an engine that cannot take new weights is refused (its ``weight_sync_refused`` message)
        when the run's optimiser steps change completions, rather than failing at the first sync."""
        engine = engine_class(self.name)
        if changes_completions and not getattr(engine, "supports_weight_sync", True):
            raise ConfigError(engine.weight_sync_refused)

    def weights_changed(self, changes_completions: bool = True) -> None:
        """After an optimiser step: sync before the next generation, unless the step cannot change a completion."""
        self.stale = self.stale or changes_completions


def rollout_groups(
    engine: GenerationEngine,
    question_ids: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    tags: Sequence[Sequence[int]],
    fork_token_ids: Sequence[int],
    settings: SamplingSettings,
    progress: Progress | None = None,
) -> list[RolloutGroup]:
    """One group per question: a completion after ``prompt + fork_token_ids[tag]`` for each of its
    tags (``tags``: B lists of G tag indices). All B*G completions share one engine call."""
    prefixes = [
        [int(t) for t in prompt] + [fork_token_ids[tag]] for prompt, group in zip(prompt_ids, tags) for tag in group
    ]
    completions = engine.generate(prefixes, settings, progress)
    groups, offset = [], 0
    for question_id, prompt, group in zip(question_ids, prompt_ids, tags, strict=True):
        groups.append(RolloutGroup(question_id, [int(t) for t in prompt], list(group), completions[offset : offset + len(group)]))
        offset += len(group)
    return groups
