"""Callbacks (importable as ``forklight.callbacks``): they observe or save, never steer training."""

from forklight.callbacks.export import HFExport
from forklight.callbacks.perf import PerfMonitor
from forklight.callbacks.predictions import PredictionWriter
from forklight.callbacks.progress import GenerationProgress
from forklight.callbacks.specialization import SpecializationMonitor
from forklight.callbacks.views import EvaluationViews

__all__ = ["EvaluationViews", "GenerationProgress", "HFExport", "PerfMonitor", "PredictionWriter", "SpecializationMonitor"]
