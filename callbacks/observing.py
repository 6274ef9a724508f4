"""What the monitoring callbacks share: where to write, and how to look without touching.

``observing(pl_module)`` runs a block under ``torch.no_grad`` and then puts back everything
training depends on: the torch (CPU and CUDA), numpy and Python random states and every
submodule's train/eval mode. A run with the monitors therefore trains bitwise identically to one
without them (``tests/test_callbacks.py`` checks this).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger


@contextmanager
def observing(pl_module: L.LightningModule) -> Iterator[None]:
    """No gradient, and RNG states and module modes restored afterwards."""
    modes = [(module, module.training) for module in pl_module.modules()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = [pl_module.device] if pl_module.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        for module, training in modes:
            module.training = training


def tensorboard_writers(trainer: L.Trainer) -> list:
    """The ``SummaryWriter`` of every TensorBoard logger, on rank zero only (empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_scalars(trainer: L.Trainer, metrics: dict[str, float], step: int | None = None) -> None:
    """Write scalars to every logger at ``step`` (default: the global step), on rank zero only."""
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
