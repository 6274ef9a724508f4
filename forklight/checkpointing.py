"""Checkpoints that survive a kill: atomic writes, and ``--ckpt_path last`` that finds the run.

``AtomicCheckpointIO`` writes a checkpoint to a temporary file in the target's own directory,
flushes it to disk and renames it over the target (``os.replace``, atomic on POSIX): a run
killed while saving leaves the previous ``last.ckpt`` whole. Lightning's ``TorchCheckpointIO``
serialises into memory, then writes through an fsspec transaction whose temporary file lives
in the system temp dir; where that is another filesystem (tmpfs ``/tmp``, a cluster's scratch),
the final move is a copy into the target path, and a kill during it truncates the checkpoint.
The forklight CLI installs ``AtomicCheckpointIO`` on every strategy that uses the plain
``TorchCheckpointIO``; with the Trainer API pass ``plugins=[AtomicCheckpointIO()]``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import tempfile
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
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
