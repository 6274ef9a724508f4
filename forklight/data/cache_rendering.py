"""The token cache's rendering (:mod:`forklight.data.cache`): a split's records in chunks of about
``CHUNK_CHARACTERS`` characters, each rendered into token-id arrays by
:func:`~forklight.data.validation.render_records`, in this process or in ``num_proc`` spawned workers that each
unpickle the tokenizer once (:func:`worker_pool`, :func:`render_task`)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import numpy as np

from forklight.data.records import QuestionRecord, RecordError
from forklight.data.validation import RenderOptions, SplitValidation, render_records


def chunk_records(records: list[QuestionRecord], characters: int) -> Iterator[list[QuestionRecord]]:
    """Consecutive chunks of ``records`` of about ``characters`` characters of text each (at least one record)."""
    chunk, size = [], 0
    for record in records:
        chunk.append(record)
        size += len(record.prompt or "") + sum(len(trace.text) for trace in record.traces)
        if size >= characters:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


@dataclass
class RenderedChunk:
    """A chunk of records rendered (in a worker): its spans as arrays, its questions' metadata and counts."""

    tokens: np.ndarray  # int32 [T_chunk]: every span's ids end to end
    span_lengths: np.ndarray  # int64 [S_chunk]: per question its prompt, then each trace
    questions: list[tuple]  # (id, answer, sources, columns, location, first span in the chunk) per kept question
    validation: SplitValidation  # counts of this chunk
    skipped: list[str]  # messages of the skipped records, logged by the parent


@dataclass
class ChunkFailure:
    """A worker's :class:`RecordError` (``data.on_bad_record: error``), raised again by the parent with its reason."""

    message: str
    reason: str


def render_chunk(records: list[QuestionRecord], tokenizer, split: str, options: RenderOptions) -> RenderedChunk:
    """:func:`~forklight.data.validation.render_records` on a chunk of a split, as arrays."""
    validation, skipped = SplitValidation(), []
    questions = render_records(records, tokenizer, split, validation, options, report_skip=skipped.append)
    spans = [ids for question in questions for ids in (question.prompt_ids, *question.trace_ids)]
    lengths = np.fromiter(map(len, spans), dtype=np.int64, count=len(spans))  # [S_chunk]
    tokens = np.fromiter(chain.from_iterable(spans), dtype=np.int32, count=int(lengths.sum()))  # [T_chunk]
    metadata, first = [], 0
    for question in questions:
        metadata.append((question.id, question.answer, question.sources, question.columns, question.location, first))
        first += 1 + len(question.trace_ids)
    return RenderedChunk(tokens, lengths, metadata, validation, skipped)


worker_tokenizer = None  # a worker process's tokenizer, unpickled once (start_worker)


def start_worker(tokenizer) -> None:
    global worker_tokenizer
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # num_proc processes, one thread each
    worker_tokenizer = tokenizer


def render_task(task: tuple[str, list[QuestionRecord], RenderOptions]) -> RenderedChunk | ChunkFailure:
    split, records, options = task
    try:
        return render_chunk(records, worker_tokenizer, split, options)
    except RecordError as error:  # pickled, a RecordError would lose its reason
        return ChunkFailure(str(error), error.reason)


@contextlib.contextmanager
def worker_pool(tokenizer, num_proc: int):
    """``num_proc`` spawned processes holding the tokenizer (None for one: render in this process)."""
    if num_proc <= 1:
        yield None
        return
    context = multiprocessing.get_context("spawn")  # no fork of a process with threads (torch, the tokenizer's)
    with context.Pool(num_proc, initializer=start_worker, initargs=(tokenizer,)) as pool:
        yield pool
