"""Model loading and parameter-efficient training: where a causal LM comes from and which of its
weights learn.

- :func:`build_causal_lm`: a pretrained Hugging Face model (hub id, local dir, a forklight export,
  or a GGUF file, dequantised to a plain model), or a fresh one built from a config (toy, tests).
- :func:`apply_lora`: LoRA adapters (peft) on the chosen modules, with the fork tokens' embedding
  and output rows trainable as well (peft's ``trainable_token_indices``), since a new tag has no
  pretrained meaning to adapt.
- :func:`exportable_model`: the model with the adapters merged into full weights, for
  ``save_pretrained`` (the training model keeps its adapters).
"""

from __future__ import annotations

import copy
import os

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
):
    """A pretrained HF causal LM from ``name_or_path`` (+ ``gguf_file``), or a fresh one from
    ``model_config`` (vocabulary and special token ids taken from ``tokenizer``)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    torch_dtype = DTYPES[dtype] if dtype is not None else None
    if name_or_path is not None:
        source, gguf = model_source(name_or_path, gguf_file)
        dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        kwargs = {dtype_key: torch_dtype} if torch_dtype is not None else {}
        if gguf is not None:
            check_gguf(source, gguf)
            kwargs["gguf_file"] = gguf
        model = AutoModelForCausalLM.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
        if gguf is not None:  # dequantised to plain weights: drop the GGUF marks so it trains and saves
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
        return model
    config = dict(model_config)
    model_type = config.pop("model_type", "llama")
    config.setdefault("vocab_size", len(tokenizer))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        config.setdefault(key, getattr(tokenizer, key))
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    return model.to(torch_dtype) if torch_dtype is not None else model


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
