"""Model loading and parameter-efficient training: where a causal LM comes from and which of its
weights learn.

- :func:`build_causal_lm`: a pretrained Hugging Face model (hub id, local dir, a forklight export,
  or a GGUF file, dequantised to a plain model), or a fresh one built from a config (toy, tests);
  :func:`build_causal_lm_skeleton`: the same model with its parameters on the meta device (FSDP2
  shards it, then :mod:`forklight.sharded_weights` fills each rank's shards).
- :func:`apply_lora`: LoRA adapters (peft) on the chosen modules, with the fork tokens' embedding
  and output rows trainable as well (peft's ``trainable_token_indices``), since a new tag has no
  pretrained meaning to adapt.
- :func:`exportable_model`: the model with the adapters merged into full weights, for
  ``save_pretrained`` (the training model keeps its adapters).
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_KEYS = {"r": int, "alpha": (int, float), "dropout": (int, float), "target_modules": (str, list)}
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def model_source(name_or_path: str | None, gguf_file: str | None = None) -> tuple[str | None, str | None]:
    """``(directory or hub id, gguf file name or None)``: ``gguf_file`` given, or a ``name_or_path``
    that is itself a ``.gguf`` file (its directory and name)."""
    if gguf_file is None and name_or_path is not None and name_or_path.endswith(".gguf"):
        return os.path.dirname(name_or_path) or ".", os.path.basename(name_or_path)
    return name_or_path, gguf_file


def check_gguf(name_or_path: str | None, gguf_file: str | None, key: str = "model.name_or_path") -> None:
    """A GGUF source must exist locally and the ``gguf`` package must be installed."""
    source, gguf = model_source(name_or_path, gguf_file)
    if gguf is None:
        return
    path = os.path.join(source, gguf)
    if os.path.isdir(source) and not os.path.isfile(path):
        raise FileNotFoundError(f"{key}: GGUF file {path} does not exist (fetch it first, e.g. "
                                "python -m forklight.examples fetch-smollm2 models/smollm2)")
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError(f"{key}={path} is a GGUF file: pip install gguf accelerate "
                          "(or pip install 'forklight[gguf]')") from error


def build_causal_lm(
    name_or_path: str | None,
    model_config: dict | None,
    tokenizer,
    dtype: str | None,
    trust_remote_code: bool,
    gguf_file: str | None = None,
    attn_implementation: str | None = None,
):
    """A pretrained HF causal LM from ``name_or_path`` (+ ``gguf_file``), or a fresh one from
    ``model_config`` (vocabulary and special token ids taken from ``tokenizer``); ``attn_implementation``:
    transformers' attention kernel (``sdpa``, ``eager``, ``flash_attention_2``, ...; unset: its default)."""
    import transformers
    from transformers import AutoModelForCausalLM

    torch_dtype = DTYPES[dtype] if dtype is not None else None
    if name_or_path is not None:
        source, gguf = model_source(name_or_path, gguf_file)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs = {dtype_key: torch_dtype} if torch_dtype is not None else {}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        if gguf is not None:
            check_gguf(source, gguf)
            kwargs["gguf_file"] = gguf
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        if gguf is not None:  # dequantised to plain weights: drop the GGUF marks so it trains and saves
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model
    extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    model = AutoModelForCausalLM.from_config(fresh_model_config(model_config, tokenizer), **extra)
    return model.to(torch_dtype) if torch_dtype is not None else model


def fresh_model_config(model_config: dict, tokenizer):
    """The ``AutoConfig`` of a fresh model (``model.model_config``, with ``model_type``): vocabulary and special token ids
    from ``tokenizer`` unless given."""
    from transformers import AutoConfig

    config = dict(model_config)
    model_type = config.pop("model_type", "llama")
    config.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.setdefault(key, getattr(tokenizer, key))
    return AutoConfig.for_model(model_type, **config)


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter a module registers inside moves to the meta device at once (no memory, and its
    initialisation costs nothing); buffers stay real. Non-persistent buffers (rotary ``inv_freq``) are
    computed in constructors and are in no checkpoint, so they must be. (accelerate's
    ``init_empty_weights(include_buffers=False)``.)"""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            registered = module._parameters[name]
            module._parameters[name] = type(registered)(registered.to("meta"), requires_grad=registered.requires_grad)

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype ``from_pretrained`` loads a checkpoint in when ``model.dtype`` is unset (transformers 5: the
    config's ``dtype``; float32 when it has none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_causal_lm_skeleton(
    name_or_path: str | None,
    model_config: dict | None,
    tokenizer,
    dtype: str | None,
    trust_remote_code: bool,
    attn_implementation: str | None = None,
):
    """The model :func:`build_causal_lm` returns (same class, config and parameter dtypes), with every parameter on
    the meta device and real buffers (:func:`parameters_on_meta`): for FSDP2, which shards it before any rank
    holds weights. Not for GGUF files (their config and dtype come from the dequantised weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"attn_implementation": attn_implementation} if attn_implementation is not None else {}
    if name_or_path is None:  # as build_causal_lm: from_config, then a cast of parameters and buffers
        with parameters_on_meta():
            model = AutoModelForCausalLM.from_config(fresh_model_config(model_config, tokenizer), **extra)
        return model.to(DTYPES[dtype]) if dtype is not None else model
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **extra)
    torch_dtype = DTYPES[dtype] if dtype is not None else checkpoint_dtype(config)
    for parameter in model.parameters():  # free on the meta device; buffers keep their dtype, as from_pretrained's do
        parameter.data = parameter.data.to(torch_dtype)
    return model


def lora_settings(lora: dict | None) -> dict | None:
    """``model.lora`` with defaults filled in; unknown keys and wrong types raise, naming the key."""
    if lora is None:
        return None
    if not isinstance(lora, dict):
        raise TypeError(f"model.lora must be a mapping {{r, alpha, dropout, target_modules}}, got {lora!r}")
    unknown = sorted(set(lora) - set(LORA_KEYS))
    if unknown:
        raise ValueError(f"model.lora has unknown keys {unknown}; allowed: {sorted(LORA_KEYS)}")
    settings = {**LORA_DEFAULTS, **lora}
    for key, kind in LORA_KEYS.items():
        if not isinstance(settings[key], kind) or isinstance(settings[key], bool):
            raise TypeError(f"model.lora.{key} has the wrong type: {settings[key]!r}")
    if settings["r"] < 1:
        raise ValueError(f"model.lora.r must be >= 1, got {settings['r']}")
    if not 0 <= settings["dropout"] < 1:
        raise ValueError(f"model.lora.dropout must be in [0, 1), got {settings['dropout']}")
    return settings


def _module_name(model, module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def apply_lora(model, settings: dict, fork_token_ids: list[int]):
    """``model`` wrapped by peft with LoRA adapters (``settings`` from :func:`lora_settings``).

    Only the adapters and the fork tokens' rows of the input embedding (and of the output layer
    when it is not tied to it) are trainable; every other weight is frozen.
    """
    try:
        import peft
    except ImportError as error:
        raise ImportError("model.lora needs peft: pip install peft") from error
    embeddings = model.get_input_embeddings()
    output = model.get_output_embeddings()
    token_rows = {_module_name(model, embeddings).split(".")[-1]: list(fork_token_ids)}
    if output is not None and output.weight.data_ptr() != embeddings.weight.data_ptr():
        token_rows[_module_name(model, output).split(".")[-1]] = list(fork_token_ids)
    config = peft.LoraConfig(
        r=settings["r"],
        lora_alpha=settings["alpha"],
        lora_dropout=settings["dropout"],
        target_modules=settings["target_modules"],
        trainable_token_indices=token_rows,
        task_type="CAUSAL_LM",
    )
    try:
        return peft.get_peft_model(model, config)
    except ValueError as error:  # e.g. target modules that the model does not have
        raise ValueError(f"model.lora: {error}") from error


def is_peft_model(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def exportable_model(model):
    """``model`` itself, or for a peft model a copy with the adapters merged into full weights."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()


@dataclass(frozen=True)
class CacheReuse:
    """What a causal LM's forward was seen to do (:func:`probe_cache_reuse`), not what its signature says.

    ``argument``: the forward's keyword that takes a KV cache back (``cache`` from transformers 5.24,
    ``past_key_values`` before), or None when no keyword continued a prompt correctly; ``logits_to_keep``:
    whether ``logits_to_keep=k`` returns the logits of the last k positions only; ``reason``: why
    ``argument`` is None (for the notice).
    """

    argument: str | None
    logits_to_keep: bool
    reason: str = ""


CACHE_ARGUMENTS = ("cache", "past_key_values")  # tried in this order


def output_cache(output):
    """The KV cache in a model output, whatever the field is called (``cache``, ``past_key_values``)."""
    from transformers.cache_utils import Cache

    return next((value for value in output.values() if isinstance(value, Cache)), None)


def shareable_cache(cache) -> bool:
    """Whether ``cache`` is a Hugging Face ``DynamicCache`` of plain full-attention layers only: then
    its rows can be indexed out (``batch_select_indices``) and padding inside it can be masked.
    Sliding-window and recurrent (linear-attention) layers cannot hide padding that way."""
    try:
        from transformers.cache_utils import DynamicCache, DynamicLayer
    except ImportError:
        return False
    layers = getattr(cache, "layers", None)
    return isinstance(cache, DynamicCache) and bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


@torch.no_grad()
def probe_cache_reuse(model, pad_id: int) -> CacheReuse:
    """Run ``model`` (in eval mode) on two prompts of different lengths, then their suffixes on the
    prompts' KV cache, and compare with the whole rows: a cache keyword counts only if it gives the
    same logits. A keyword that the forward swallows into ``**kwargs`` (and ignores) gives other
    logits, so a renamed argument is found, and a cache that cannot hide prompt padding is refused."""
    vocab = int(model.get_input_embeddings().weight.shape[0])  # peft's token wrapper has no num_embeddings
    device = next(model.parameters()).device
    ids = [(token * 7 + 3) % vocab for token in range(9)]
    prompts, suffixes = [ids[:4], ids[4:6] + [pad_id, pad_id]], [ids[6:8], ids[8:9] + ids[:1]]  # right-padded
    prompt_ids = torch.tensor(prompts, device=device)  # [2, 4]
    suffix_ids = torch.tensor(suffixes, device=device)  # [2, 2]
    starts = torch.tensor([4, 2], device=device)  # [2] prompt lengths
    rows = [prompts[0] + suffixes[0], prompts[1][:2] + suffixes[1]]  # whole rows, 6 and 4 tokens
    try:  # [2, V] each: the suffix positions' logits of each whole row
        full = [model(input_ids=torch.tensor([row], device=device), use_cache=False).logits[0, -2:].float() for row in rows]
    except Exception as error:  # noqa: BLE001 - any failure means: no sharing
        return CacheReuse(None, False, f"the forward failed on a probe ({type(error).__name__}: {error})")
    try:
        kept = model(input_ids=prompt_ids, use_cache=False, logits_to_keep=1).logits.shape[1] == 1
    except Exception:  # noqa: BLE001
        kept = False
    position_ids = starts[:, None] + torch.arange(2, device=device)  # [2, 2]
    mask = torch.cat([torch.arange(4, device=device) < starts[:, None], torch.ones(2, 2, dtype=torch.bool, device=device)], 1)
    scale = max(float(f.abs().max()) for f in full)
    ignored = max(float((model(input_ids=suffix_ids, position_ids=position_ids, use_cache=False).logits[r].float() - full[r])
                        .abs().max()) for r in range(2))  # what ignoring the prompt costs
    reason = "its forward returned no Hugging Face cache"
    for argument in CACHE_ARGUMENTS:
        try:
            cache = output_cache(model(input_ids=prompt_ids, use_cache=True))
            if cache is None:
                break
            if not shareable_cache(cache):
                reason = f"its KV cache ({type(cache).__name__}) has sliding-window or recurrent layers"
                break
            logits = model(input_ids=suffix_ids, position_ids=position_ids, attention_mask=mask.long(),
                           use_cache=True, **{argument: cache}).logits.float()  # [2, 2, V]
        except Exception as error:  # noqa: BLE001
            reason = f"passing the cache as {argument}= failed ({type(error).__name__})"
            continue
        error = max(float((logits[r] - full[r]).abs().max()) for r in range(2))
        if error <= max(1e-4 * scale, 0.01 * ignored):
            return CacheReuse(argument, kept)
        reason = f"no keyword ({', '.join(CACHE_ARGUMENTS)}) continued a prompt from its cache"
    return CacheReuse(None, kept, reason)


HALF_DTYPES = (torch.bfloat16, torch.float16)


def keep_master_weights(model, dtype: str | None, precision: str, learning_rate: float, sharded: bool,
                        sharded_mixed_precision: bool = False) -> str:
    """Keep fp32 master copies of the weights that train when ``model.dtype`` loads them in half precision.

    Under ``trainer.precision: bf16-mixed`` (or ``16-mixed``) the trainable weights become float32 (all
    weights when FSDP2 shards the model, which needs one dtype) and autocast computes in half precision,
    as in every mixed-precision trainer; frozen weights stay in ``model.dtype``. A half-precision weight
    without a master copy loses every AdamW update smaller than half its spacing (bfloat16: 2^-8 of
    the weight; at learning rate 1e-5 most updates), so the other precisions only warn. Returns what
    was done (``"fp32 masters"``, ``"warned"`` or ``""``). ``sharded_mixed_precision``: FSDP2 computes in half
    precision itself (``trainer.strategy.init_args.param_dtype``, ``trainer.precision: 32-true``), so every weight
    becomes a float32 master shard.
    """
    from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

    trainable = [p for p in model.parameters() if p.requires_grad]
    pure_half = precision in ("bf16-true", "16-true", "bf16", "16", "half")  # Lightning casts every weight
    half = pure_half or any(p.dtype in HALF_DTYPES for p in trainable)
    if not trainable or not half:
        return ""
    if sharded_mixed_precision:
        model.float()
        rank_zero_info(f"forklight: model.dtype={dtype}: every weight is a float32 master shard; FSDP2 all-gathers and "
                       "computes in trainer.strategy.init_args.param_dtype")
        return "fp32 masters"
    if precision.endswith("-mixed"):
        if sharded:
            model.float()
        else:
            for parameter in trainable:
                parameter.data = parameter.data.float()
        rank_zero_info(f"forklight: model.dtype={dtype}: the {sum(p.numel() for p in trainable):,} trainable weights "
                       f"train as float32 master weights; trainer.precision={precision} computes in half precision")
        return "fp32 masters"
    rank_zero_warn(
        f"model.dtype={dtype} with trainer.precision={precision} trains half-precision weights without an fp32 "
        f"master copy: an AdamW update smaller than ~2^-9 of a weight rounds away, and at "
        f"model.learning_rate={learning_rate:g} most do. Set trainer.precision=bf16-mixed (forklight then keeps "
        "fp32 master weights) or leave model.dtype unset.")
    return "warned"


@torch.no_grad()
def probe_packing(model) -> str:
    """Why ``model`` cannot take packed rows ("" when it can): two sequences packed in one row, positions restarting
    at the second, must give the logits each gives alone (attention must not cross sequences)."""
    device = next(model.parameters()).device
    first, second = torch.tensor([1, 2, 3, 4], device=device), torch.tensor([5, 6, 7], device=device)
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)  # [1, 7]
    was_training = model.training
    model.eval()
    try:
        alone = torch.cat([model(input_ids=ids[None], use_cache=False).logits[0] for ids in (first, second)])  # [7, V]
        packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False).logits[0]
    except Exception as error:  # noqa: BLE001 (a model whose forward rejects position_ids)
        return f"its forward fails on packed rows ({type(error).__name__}: {error})"
    finally:
        model.train(was_training)
    if not torch.allclose(alone.float(), packed.float(), rtol=1e-4, atol=1e-4):
        return ("attention crosses sequences in a packed row (its attention implementation ignores restarting "
                "position_ids; try model.attn_implementation: sdpa, eager or flash_attention_2)")
    return ""
