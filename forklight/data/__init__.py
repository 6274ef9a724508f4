"""Data: records, rendering/tokenisation, validation at setup, batching, the ForkDataModule and the toy task."""

from forklight.data.datamodule import ForkDataModule, ToyTask
from forklight.data.records import FieldNames, QuestionRecord, RecordError, Trace

__all__ = ["FieldNames", "ForkDataModule", "QuestionRecord", "RecordError", "ToyTask", "Trace"]
