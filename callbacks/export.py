"""``HFExport``: at the end of ``fit``, save a model that plain ``transformers`` loads.

Writes ``save_pretrained`` weights and config, the tokenizer with its fork tokens and chat
template, and ``forklight.json`` (fork tokens, their ids, the default tag, tag coverage), so::

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)

generate with any tag and no forklight import. LoRA adapters are merged into full weights (in a
copy; training goes on with its adapters). A sharded model (FSDP2, FSDP) is gathered into full
weights on rank 0's CPU first (every rank takes part), and rank 0 writes them.
"""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from forklight.models import DTYPES, exportable_model
from forklight.sharding import full_state_dict, unsharded_class_name
from forklight.starting import METADATA_FILE


def export_pretrained(pl_module, directory: str, state_dict: dict | None = None) -> str:
    """Save ``pl_module``'s HF model, tokenizer and fork-token metadata into ``directory``.

    ``state_dict``: the model's full weights when it is sharded (:func:`forklight.sharding.full_state_dict`).
    """
    os.makedirs(directory, exist_ok=True)
    model = exportable_model(pl_module.model)
    dtype = DTYPES.get(pl_module.hparams.get("dtype") or "")
    if dtype is not None:  # fp32 master weights (models.keep_master_weights) are written in model.dtype
        state_dict = {key: value.to(dtype) if value.is_floating_point() else value
                      for key, value in (state_dict if state_dict is not None else model.state_dict()).items()}
    model.save_pretrained(directory, state_dict=state_dict)
    if dtype is not None or state_dict is not None:
        config = model.config
        config.architectures = [unsharded_class_name(model)]  # FSDP2 renames the class to FSDP<name>
        if dtype is not None:
            config.dtype = dtype
        config.save_pretrained(directory)
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
    return directory


class HFExport(L.Callback):
    def __init__(self, dirpath: str | None = None) -> None:
        """Export a ``transformers``-loadable model when ``fit`` ends (not after ``fast_dev_run``,
        which writes no run artefacts).

        Args:
            dirpath: where to write; default ``<run dir>/export`` (the logger's version dir).
        """
        self.dirpath = dirpath

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        directory = self.dirpath or os.path.join(trainer.log_dir or trainer.default_root_dir, "export")
        state_dict = full_state_dict(trainer, pl_module)  # sharded: a collective, on every rank
        if trainer.is_global_zero:
            export_pretrained(pl_module, directory, state_dict)
            rank_zero_info(f"forklight: exported model, tokenizer and {METADATA_FILE} to {directory}")
        trainer.strategy.barrier("forklight_export")
