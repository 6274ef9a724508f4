"""Where a run starts (``model.init_from``): a forklight export or checkpoint, or a glob of them.

Resolved once (:func:`resolve_init_from`) into a :class:`StartingPoint`: the model identity it
fixes (``IDENTITY_KEYS``: weights come from there, tokenizer, fork tokens), which the module saves
as its hyperparameters, and the weights a checkpoint holds (:meth:`StartingPoint.load_weights`).
A checkpoint is a Lightning ``.ckpt`` file or a sharded checkpoint directory (DCP: what FSDP2 runs
save, one file per rank plus ``meta.pt``); under FSDP2 each rank then reads only its own slices.
The CLI uses :func:`tokenizer_name` to give the data module the same tokenizer.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import torch

from forklight.checkpointing import (SHARDED_METADATA, is_sharded_checkpoint, refuse_lora_checkpoint,
                                    refuse_missing_weights)
from forklight.data.rendering import TOY_TOKENIZER

# What a checkpoint or export fixes about the model it holds (the rest comes from the config).
IDENTITY_KEYS = ("name_or_path", "gguf_file", "model_config", "tokenizer", "num_fork_tokens", "fork_token_format", "end_token")
METADATA_FILE = "forklight.json"  # written by forklight.callbacks.HFExport next to the weights


@dataclass(frozen=True)
class StartingPoint:
    """A resolved ``model.init_from``."""

    path: str  # the export dir, .ckpt or sharded checkpoint dir (a glob's newest match); saved, so a resume finds it
    kind: str  # "export", "checkpoint" (a .ckpt file) or "sharded" (a DCP checkpoint directory)
    identity: dict  # what it fixes about the model: the IDENTITY_KEYS it has
    metadata: dict = field(default_factory=dict)  # an export's forklight.json ({} for a checkpoint)

    def hyperparameters(self, num_fork_tokens: int | None) -> dict:
        """The hyperparameters it fixes (identity, resolved ``init_from`` and tokenizer), after checking
        that the config asks for as many fork tokens as it has (None: whatever it has)."""
        start_tags = self.identity.get("num_fork_tokens", 6)
        if num_fork_tokens is not None and num_fork_tokens != start_tags:
            raise ValueError(
                f"model.num_fork_tokens={num_fork_tokens} but model.init_from={self.path} has {start_tags} fork "
                f"tokens; set model.init_args.num_fork_tokens={start_tags}"
            )
        identity = self.identity
        tokenizer = tokenizer_name(identity.get("tokenizer"), identity.get("name_or_path"), gguf_file=identity.get("gguf_file"))
        return {**identity, "init_from": self.path, "tokenizer": tokenizer}

    @property
    def tag_coverage(self) -> list[float] | None:
        """An export's traces per tag (its default tag carries over); a checkpoint's is in its weights."""
        return self.metadata.get("tag_coverage") or None

    def load_weights(self, module: torch.nn.Module) -> None:
        """Into ``module``: a checkpoint's model weights and tag coverage (a resume then loads over them).
        An export's weights are loaded when its model is built (``name_or_path``); nothing to do here."""
        if self.kind == "sharded":
            from forklight.sharded_weights import load_sharded_checkpoint

            dtype = next(module.model.parameters()).dtype  # the dtype the model was built in, as for a .ckpt
            load_sharded_checkpoint(module.model, self.path, dtype, extra={"tag_coverage": module.tag_coverage})
            return
        if self.kind != "checkpoint":
            return
        state = self.checkpoint_state()
        wanted = {key: value for key, value in state.items() if key.startswith("model.") or key == "tag_coverage"}
        refuse_missing_weights(f"model.init_from={self.path}",
                               [key for key in module.state_dict() if key.startswith("model.") and key not in wanted])
        module.load_state_dict(wanted, strict=False)

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """A ``.ckpt``'s ``state_dict`` (memory-mapped: tensors are read when used), refusing a LoRA run's."""
        state = torch.load(self.path, weights_only=True, map_location="cpu", mmap=True)["state_dict"]
        refuse_lora_checkpoint(self.path, state)
        return state

    def load_tag_coverage(self, module: torch.nn.Module) -> None:
        """Only the tag coverage of a ``.ckpt`` (its weights fill a sharded model elsewhere)."""
        if self.kind == "checkpoint":
            module.tag_coverage.copy_(self.checkpoint_state()["tag_coverage"])


def resolve_init_from(init_from: str) -> StartingPoint:
    """Where a run starts. ``init_from`` is an HF export dir (with ``forklight.json``), a Lightning
    ``.ckpt``, a sharded checkpoint dir (with ``meta.pt``), or a glob of any of them (the newest match
    wins, e.g. ``runs/ssft/version_*/export`` or ``runs/ssft/version_*/checkpoints/last.ckpt``).
    """
    path = init_from
    if any(char in init_from for char in "*?["):
        matches = sorted(glob.glob(init_from), key=os.path.getmtime)
        if not matches:
            raise FileNotFoundError(
                f"model.init_from={init_from!r} matches nothing; train the starting model first "
                "(e.g. forklight fit -c configs/ssft.yaml) or point init_from at its export or checkpoint"
            )
        path = matches[-1]
    if is_sharded_checkpoint(path):
        saved = torch.load(os.path.join(path, SHARDED_METADATA), weights_only=True, map_location="cpu")
        identity = saved.get("hyper_parameters", {})
        return StartingPoint(path, "sharded", {key: identity[key] for key in IDENTITY_KEYS if key in identity})
    if os.path.isdir(path):
        metadata_file = os.path.join(path, METADATA_FILE)
        if not os.path.isfile(metadata_file):
            raise FileNotFoundError(f"model.init_from={path!r} is a directory without {METADATA_FILE} (a forklight "
                                    f"export) or {SHARDED_METADATA} (a sharded checkpoint)")
        with open(metadata_file) as handle:
            metadata = json.load(handle)
        identity = {"name_or_path": path, "gguf_file": None, "tokenizer": path, "model_config": None,
                    "num_fork_tokens": len(metadata["fork_tokens"])}
        return StartingPoint(path, "export", identity, metadata)
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        return StartingPoint(path, "checkpoint", {key: saved[key] for key in IDENTITY_KEYS if key in saved})
    raise FileNotFoundError(f"model.init_from={path!r} does not exist (expected an export dir, a .ckpt file or a "
                            "sharded checkpoint dir)")


def tokenizer_name(
    tokenizer: str | None, name_or_path: str | None, init_from: str | None = None, gguf_file: str | None = None
) -> str:
    """The tokenizer a module uses: ``tokenizer``, else the starting point's, else the model's (its
    ``.gguf`` file when it has one), else ``toy``."""
    if tokenizer:
        return tokenizer
    if init_from:
        try:
            identity = resolve_init_from(init_from).identity
        except FileNotFoundError:  # e.g. --print_config before the starting run exists; the module reports it
            pass
        else:
            name_or_path, gguf_file = identity.get("name_or_path"), identity.get("gguf_file")
            if identity.get("tokenizer"):
                return identity["tokenizer"]
    if name_or_path and gguf_file:
        return os.path.join(name_or_path, gguf_file)
    return name_or_path or TOY_TOKENIZER
