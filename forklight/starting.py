"""Where a run starts (``model.init_from``): a forklight export or checkpoint, or a glob of them.

Resolved once into the model identity it fixes (``IDENTITY_KEYS``: weights come from there,
tokenizer, fork tokens); the CLI uses :func:`tokenizer_name` to give the data module the same
tokenizer.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from forklight.data.rendering import TOY_TOKENIZER

# What a checkpoint or export fixes about the model it holds (the rest comes from the config).
IDENTITY_KEYS = ("name_or_path", "gguf_file", "model_config", "tokenizer", "num_fork_tokens", "fork_token_format", "end_token")
METADATA_FILE = "forklight.json"  # written by forklight.callbacks.HFExport next to the weights


def resolve_init_from(init_from: str) -> dict:
    """Where a run starts: ``{"path", "kind": "export"|"checkpoint", "identity": {...}, "metadata"}``.

    ``init_from`` is an HF export dir (with ``forklight.json``), a Lightning ``.ckpt``, or a glob
    of either (the newest match wins, e.g. ``runs/ssft/version_*/export``).
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
    if os.path.isdir(path):
        metadata_file = os.path.join(path, METADATA_FILE)
        if not os.path.isfile(metadata_file):
            raise FileNotFoundError(f"model.init_from={path!r} is a directory without {METADATA_FILE}: not a forklight export")
        with open(metadata_file) as handle:
            metadata = json.load(handle)
        identity = {"name_or_path": path, "gguf_file": None, "tokenizer": path, "model_config": None,
                    "num_fork_tokens": len(metadata["fork_tokens"])}
        return {"path": path, "kind": "export", "identity": identity, "metadata": metadata}
    if os.path.isfile(path):
        saved = torch.load(path, weights_only=True, map_location="cpu", mmap=True).get("hyper_parameters", {})
        identity = {key: saved[key] for key in IDENTITY_KEYS if key in saved}
        return {"path": path, "kind": "checkpoint", "identity": identity, "metadata": {}}
    raise FileNotFoundError(f"model.init_from={path!r} does not exist (expected an export dir or a .ckpt file)")


def tokenizer_name(
    tokenizer: str | None, name_or_path: str | None, init_from: str | None = None, gguf_file: str | None = None
) -> str:
    """The tokenizer a module uses: ``tokenizer``, else the starting point's, else the model's (its
    ``.gguf`` file when it has one), else ``toy``."""
    if tokenizer:
        return tokenizer
    if init_from:
        try:
            identity = resolve_init_from(init_from)["identity"]
        except FileNotFoundError:  # e.g. --print_config before the starting run exists; the module reports it
            pass
        else:
            name_or_path, gguf_file = identity.get("name_or_path"), identity.get("gguf_file")
            if identity.get("tokenizer"):
                return identity["tokenizer"]
    if name_or_path and gguf_file:
        return os.path.join(name_or_path, gguf_file)
    return name_or_path or TOY_TOKENIZER
