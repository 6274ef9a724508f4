"""Checkpoints that survive a kill: atomic writes, and ``--ckpt_path last`` that finds the run.

``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the target's own directory,
flushes it to disk and renames it over the target (``os.replace``, atomic on POSIX): a run
killed while saving leaves the previous ``last.ckpt`` whole. Lightning's ``TorchCheckpointIO``
serialises into memory, then writes through an fsspec transaction whose temporary file lives
in the system temp dir; where that is another filesystem (tmpfs ``/tmp``, a cluster's scratch),
the final move is a copy into the target path, and a kill during it truncates the checkpoint.
The forklight CLI installs ``AtomicCheckpointIO`` on every strategy that uses the plain
``TorchCheckpointIO``; with the Trainer API pass ``plugins=[AtomicCheckpointIO()]``.

It also reads a sharded checkpoint directory (what FSDP2 runs save: DCP shards plus ``meta.pt``)
where a strategy that does not shard asks for a checkpoint (``forklight test --ckpt_path <dir>``
on one device): the weights consolidated in memory (:func:`load_sharded_as_whole`), without the
sharded optimiser state, so ``fit`` cannot resume from it there (the CLI says what to do instead).
Reading one in place (:func:`load_sharded`, each rank its own slices under FSDP2) and refusing starting
weights that are not the model's (:func:`refuse_lora_checkpoint`, :func:`refuse_missing_weights`) are shared
with :mod:`forklight.starting` and :mod:`forklight.sharded_weights`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


SHARDED_METADATA = "meta.pt"  # Lightning's: everything of a sharded checkpoint but its weights and optimiser state


def is_sharded_checkpoint(path) -> bool:
    """Whether ``path`` is a sharded (DCP) checkpoint directory (``meta.pt`` next to the shards)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, SHARDED_METADATA))


def sharded_contents(path) -> dict[str, Any]:
    """What a sharded checkpoint directory holds: key (``state_dict.model.model.embed_tokens.weight``, ...) -> its
    DCP metadata (a tensor's size and dtype)."""
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(path).read_metadata().state_dict_metadata


def load_sharded(state: dict[str, Any], path, no_dist: bool) -> None:
    """Read ``state``'s tensors in place from the sharded checkpoint directory ``path`` (DCP: a DTensor gets only
    its own rank's slices); ``no_dist``: by this process alone, which PyTorch warns it then assumes (it is meant)."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=no_dist)


def load_sharded_as_whole(path, weights_only: bool | None = None) -> dict[str, Any]:
    """A sharded checkpoint directory as a whole Lightning checkpoint: ``meta.pt`` plus ``state_dict`` (every
    weight read whole by this process), without ``optimizer_states`` (they stay sharded)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    checkpoint = torch.load(os.path.join(path, SHARDED_METADATA), weights_only=weights_only, map_location="cpu")
    weights = {key: torch.empty(item.size, dtype=item.properties.dtype) for key, item in sharded_contents(path).items()
               if key.startswith("state_dict.") and isinstance(item, TensorStorageMetadata)}
    load_sharded(weights, path, no_dist=True)
    checkpoint["state_dict"] = {key[len("state_dict."):]: value for key, value in weights.items()}
    return checkpoint


def refuse_lora_checkpoint(path: str, keys: Iterable[str]) -> None:
    """A checkpoint (``model.init_from``) whose keys name LoRA adapters is a LoRA run's: the merged weights to start
    from are in its export."""
    if any("lora_" in key for key in keys):
        raise ValueError(f"model.init_from={path} is a checkpoint of a LoRA run; start from its export "
                         "(merged weights: runs/<name>/version_<k>/export) instead")


def refuse_missing_weights(what: str, missing: list[str]) -> None:
    """The starting weights ``what`` (``model.init_from=<path>``, ``model.name_or_path=<id>``) lack the model's
    weights ``missing`` (none: nothing to say)."""
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} of the model's weights (e.g. {missing[:3]}); is it a checkpoint "
                         "of this model?")


class AtomicCheckpointIO(TorchCheckpointIO):
    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        if is_sharded_checkpoint(path):
            return load_sharded_as_whole(path, weights_only)
        if map_location is None:
            return super().load_checkpoint(path, weights_only=weights_only)
        return super().load_checkpoint(path, map_location, weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = os.fspath(path)
        if storage_options is not None or "://" in path:  # remote storage: fsspec's transaction as before
            return super().save_checkpoint(checkpoint, path, storage_options)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        prefix = f".{os.path.basename(path)}."
        for stale in glob.glob(os.path.join(glob.escape(directory), glob.escape(prefix) + "*.tmp")):
            with contextlib.suppress(OSError):  # left by a run killed while saving
                os.remove(stale)
        handle, temporary = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise
        with contextlib.suppress(OSError):  # make the rename itself durable
            directory_handle = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(directory_handle)
            finally:
                os.close(directory_handle)


def use_atomic_checkpoints(trainer) -> None:
    """Give ``trainer``'s strategy an :class:`AtomicCheckpointIO` where it uses the plain Torch one."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def find_last_checkpoint(save_dir: str, name: str) -> str | None:
    """The newest ``last*.ckpt`` under ``<save_dir>/<name>/<version>/checkpoints/`` (None if none).

    Lightning resolves ``ckpt_path="last"`` only in the *new* run's checkpoint directory, which a
    versioned logger makes empty, so a resume would silently start from scratch.
    """
    pattern = os.path.join(glob.escape(save_dir), glob.escape(name), "*", "checkpoints", "last*.ckpt")
    found = [path for path in glob.glob(pattern) if re.fullmatch(r"last(-v?\d+)?\.ckpt", os.path.basename(path))]
    return max(found, key=os.path.getmtime) if found else None
