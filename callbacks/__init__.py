"""Callbacks (importable as ``forklight.callbacks``): they observe or save, never steer training."""

from forklight.callbacks.export import HFExport

__all__ = ["HFExport"]
