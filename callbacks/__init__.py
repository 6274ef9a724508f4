"""Callbacks (importable as ``forklight.callbacks``): they observe or save, never steer training."""

from forklight.callbacks.export import HFExport
from forklight.callbacks.predictions import PredictionWriter

__all__ = ["HFExport", "PredictionWriter"]
