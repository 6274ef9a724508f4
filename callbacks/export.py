"""``HFExport``: at the end of ``fit``, save a model that plain ``transformers`` loads.

Writes ``save_pretrained`` weights and config, the tokenizer with its fork tokens and chat
template, and ``forklight.json`` (fork tokens, their ids, the default tag, tag coverage), so::

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)

generate with any tag and no forklight import. LoRA adapters are merged into full weights (in a
copy; training goes on with its adapters). An FSDP2-sharded model is streamed: one parameter at a
time is gathered (every rank takes part) and rank 0 writes safetensors shards of at most
``max_shard_size`` as they fill (:func:`~forklight.sharded_weights.write_streamed_export`), so no
rank holds the whole model. Under FSDP (``fsdp.yaml``) the full weights are gathered onto rank 0's
CPU first, and rank 0 writes them.
"""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from forklight.models import DTYPES, exportable_model
from forklight.sharded_weights import write_streamed_export
from forklight.sharding import full_state_dict, is_fsdp2_sharded, transformer_blocks, unsharded_class_name
from forklight.starting import METADATA_FILE

DEFAULT_SHARD_SIZE = "5GB"


def export_pretrained(pl_module, directory: str, state_dict: dict | None = None) -> str:
    """Save ``pl_module``'s HF model, tokenizer and fork-token metadata into ``directory``.

    ``state_dict``: the model's full weights when it is sharded by FSDP (:func:`forklight.sharding.full_state_dict`).
    """
    os.makedirs(directory, exist_ok=True)
    model = exportable_model(pl_module.model)
    dtype = DTYPES.get(pl_module.hparams.get("dtype") or "")
    if dtype is not None:  # fp32 master weights (models.keep_master_weights) are written in model.dtype
        state_dict = {key: value.to(dtype) if value.is_floating_point() else value
                      for key, value in (state_dict if state_dict is not None else model.state_dict()).items()}
    model.save_pretrained(directory, state_dict=state_dict)
    if dtype is not None or state_dict is not None:
        write_config(model, directory, dtype)
    write_metadata(pl_module, directory)
    return directory


def export_sharded_pretrained(pl_module, directory: str, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> str:
    """:func:`export_pretrained` for an FSDP2-sharded model, streamed (every rank calls it; rank 0 writes): the
    same files, weights in safetensors shards of at most ``max_shard_size`` (bytes, or e.g. ``"5GB"``)."""
    from lightning.pytorch.utilities import rank_zero_only

    model = pl_module.model
    dtype = DTYPES.get(pl_module.hparams.get("dtype") or "")
    limit = size_in_bytes(max_shard_size)
    names = {module: name for name, module in model.named_modules()}
    blocks = [names[block] for block in transformer_blocks(model, pl_module.hparams.get("shard_block_classes"))]
    write_streamed_export(model, directory, dtype, limit, blocks)
    if rank_zero_only.rank == 0:
        write_config(model, directory, dtype or next(model.parameters()).dtype)
        if model.can_generate():
            model.generation_config.save_pretrained(directory)
        write_metadata(pl_module, directory)
    return directory


SIZE_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}


def size_in_bytes(size: int | str) -> int:
    """``max_shard_size`` in bytes: a number, or a string such as ``"5GB"`` or ``"512MiB"`` (as ``save_pretrained``)."""
    if isinstance(size, int):
        return size
    text = str(size).strip().upper()
    for unit, factor in SIZE_UNITS.items():
        if text.endswith(unit) and text[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[: -len(unit)]) * factor)
    if text.isdigit():
        return int(text)
    raise ValueError(f"HFExport max_shard_size={size!r}: give bytes or a size such as '5GB' or '512MiB'")


def write_config(model, directory: str, dtype) -> None:
    """``config.json`` naming the model's own class (FSDP2 renames it ``FSDP<name>``) and the weights' dtype."""
    config = model.config
    config.architectures = [unsharded_class_name(model)]
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(directory)


def write_metadata(pl_module, directory: str) -> None:
    """The tokenizer (with its fork tokens and chat template) and ``forklight.json``."""
    pl_module.tokenizer.save_pretrained(directory)
    metadata = {
        "fork_tokens": pl_module.fork_tokens,
        "fork_token_ids": pl_module.fork_token_ids,
        "default_tag": pl_module.fork_tokens[pl_module.default_tag],
        "default_tag_index": pl_module.default_tag,
        "tag_coverage": pl_module.tag_coverage.tolist(),
        "stop_token_ids": pl_module.stop_ids,
        # How to pick a tag: "learned" = softmax of the logits after the prompt restricted to
        # fork_token_ids (sample, or argmax); "coverage" = default_tag; "uniform" = any tag.
        "fork_policy": pl_module.hparams.get("fork_policy", "coverage"),
        "method": type(pl_module).__name__,
        "hparams": {key: value for key, value in pl_module.hparams.items() if isinstance(value, (str, int, float, bool, type(None)))},
    }
    with open(os.path.join(directory, METADATA_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2)


class HFExport(L.Callback):
    def __init__(self, dirpath: str | None = None, max_shard_size: int | str = DEFAULT_SHARD_SIZE) -> None:
        """Export a ``transformers``-loadable model when ``fit`` ends (not after ``fast_dev_run``,
        which writes no run artefacts).

        Args:
            dirpath: where to write; default ``<run dir>/export`` (the logger's version dir).
            max_shard_size: the largest safetensors file of an FSDP2 export (bytes or ``"5GB"``): rank 0 holds at
                most this much of the model while streaming it out.
        """
        self.dirpath = dirpath
        self.max_shard_size = size_in_bytes(max_shard_size)  # a bad value fails now, not at the end of the run

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        directory = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "export")
        if is_fsdp2_sharded(pl_module.model):
            export_sharded_pretrained(pl_module, directory, self.max_shard_size)  # a collective, on every rank
        else:
            state_dict = full_state_dict(trainer, pl_module)  # FSDP: a collective, on every rank
            if trainer.is_global_zero:
                export_pretrained(pl_module, directory, state_dict)
        rank_zero_info(f"forklight: exported model, tokenizer and {METADATA_FILE} to {directory}")
        trainer.strategy.barrier("forklight_export")
