"""The token cache: a split's rendered token ids, tokenised once and memory-mapped by every rank on every run.

Without it, ``ForkDataModule.setup`` reads every record and tokenises every trace on every rank at every start
(at 100k questions x 4 traces x 16k tokens: hours, and ~36 bytes of Python list per token on each rank). With it
(``data.cache: true``, the default), the first run renders each split once and writes an *entry*; every later run
with the same key, and every other rank, memory-maps the entry instead::

    <data.cache_dir>/<name>-<key>/   # cache_dir null: $FORKLIGHT_CACHE_DIR, else ~/.cache/forklight/tokens
        entry.json                   # what the key was made of; per split its questions
        <split>.tokens.npy           # int32 [T]: the split's token ids, every span end to end
        <split>.spans.npy            # int64 [S + 1]: span s is tokens[spans[s] : spans[s + 1]]
        questions.pkl                # per question: id, answer, sources, columns, location, first span;
                                     # per split its SplitValidation; the warnings the build logged

A question's spans are consecutive: its prompt, then each trace (trace + end-of-turn). The key hashes everything
that decides those ids (:func:`entry_identity`): the data's content (a file's bytes, every file of a local dir, a
``datasets`` name's ``_fingerprint``; and its path, which the cached locations name), the tokenizer (its name, its serialised vocab/merges/added tokens, its chat
template), every option in :data:`KEY_OPTIONS`, the source of the modules that read and render
(:data:`RENDERING_MODULES`), the tokenizer libraries' versions and :data:`CACHE_FORMAT`. A file's hash is kept
beside the entries, keyed by the file's identity (device, inode, size, modification and change times), so a
re-run does not read the data again.

An entry is built in a temporary directory and renamed into place when complete (:func:`publish`): a killed
build leaves only an ignored ``*.tmp-*`` directory, and of two concurrent builders (ranks of two nodes on a
shared filesystem) the first to finish wins, the other discards its copy. ``num_proc`` worker processes render
chunks of records (each unpickles the tokenizer once and batch-encodes with it).

What a rank holds of a cached split: :class:`CachedQuestion` s, the metadata of each question, whose
``prompt_ids``/``trace_ids`` are read from the memory-mapped arrays when asked for (as Python lists, like a
:class:`~forklight.data.rendering.RenderedQuestion`'s); :class:`~forklight.data.batching.QuestionDataset` turns
only a batch's questions into lists, and the sampler takes lengths from the span offsets. The mapped pages are
the kernel's page cache: shared by the ranks of a node, and dropped under memory pressure.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forklight.data.cache_key import CACHE_DIR_ENV, CACHE_FORMAT
from forklight.data.cache_rendering import ChunkFailure, chunk_records, render_chunk, render_task, worker_pool
from forklight.data.records import QuestionRecord, RecordError
from forklight.data.rendering import RenderedQuestion
from forklight.data.validation import RenderOptions, SplitValidation, warn_overlong
from forklight.errors import ConfigError

log = logging.getLogger(__name__)

CHUNK_CHARACTERS = 4_000_000  # characters of text per chunk of records handed to a worker (~1M tokens)
SKIP_LOGGER = "forklight.data.validation"  # the logger render_records reports skipped records with


# ---- a cached split -------------------------------------------------------------------------
class SplitTokens:
    """A split's token ids in an entry, memory-mapped: span s is ``tokens[spans[s] : spans[s + 1]]``.
    Pickles as its path (a DataLoader worker maps the files again)."""

    def __init__(self, directory: Path, split: str) -> None:
        self.directory, self.split = Path(directory), split
        self.tokens = np.load(self.directory / f"{split}.tokens.npy", mmap_mode="r")  # int32 [T]
        self.spans = np.load(self.directory / f"{split}.spans.npy", mmap_mode="r")  # int64 [S + 1]

    def __reduce__(self):
        return SplitTokens, (self.directory, self.split)

    def ids(self, span: int) -> list[int]:
        """Span ``span``'s token ids, as a list."""
        return self.tokens[self.spans[span] : self.spans[span + 1]].tolist()

    def lengths(self, first: int, count: int) -> list[int]:
        """Tokens in spans ``first`` .. ``first + count - 1`` (from the offsets alone)."""
        return np.diff(self.spans[first : first + count + 1]).tolist()


@dataclass(slots=True, eq=False)
class CachedQuestion:
    """A question of a cached split: its metadata in memory, its token ids in the entry's memory-mapped arrays.

    ``prompt_ids`` and ``trace_ids`` read them as lists (as a :class:`RenderedQuestion` holds them), so any code
    written for one works on the other; batches take :meth:`rendered`, lengths come from the offsets."""

    id: str
    answer: str | None
    sources: list[str | None]  # one per trace
    columns: dict
    location: str
    tokens: SplitTokens = field(repr=False)
    first_span: int  # the prompt's span; trace j is span first_span + 1 + j

    @property
    def trained(self) -> None:  # a cached question is always whole (RenderedQuestion.trained)
        return None

    @property
    def prompt_length(self) -> int:
        return self.tokens.lengths(self.first_span, 1)[0]

    @property
    def trace_lengths(self) -> list[int]:
        return self.tokens.lengths(self.first_span + 1, len(self.sources))

    @property
    def prompt_ids(self) -> list[int]:
        return self.tokens.ids(self.first_span)

    @property
    def trace_ids(self) -> list[list[int]]:
        return [self.tokens.ids(self.first_span + 1 + j) for j in range(len(self.sources))]

    def rendered(self, traces: list[int] | None = None) -> RenderedQuestion:
        """The question with its token ids read into lists; ``traces``: only those traces (default all)."""
        traces = range(len(self.sources)) if traces is None else traces
        return RenderedQuestion(id=self.id, prompt_ids=self.prompt_ids,
                                trace_ids=[self.tokens.ids(self.first_span + 1 + j) for j in traces],
                                sources=[self.sources[j] for j in traces], answer=self.answer, columns=self.columns,
                                location=self.location)


@dataclass
class CachedSplit:
    """One split of an entry: its questions and what validation did to it when the entry was built."""

    questions: list[CachedQuestion]
    validation: SplitValidation
    tokens: int  # token ids in the split


@dataclass
class CacheEntry:
    """An opened entry."""

    directory: Path
    splits: dict[str, CachedSplit]  # in the order setup reads them
    warnings: list[tuple[str, int, str]]  # (logger, level, message) the build logged, logged again on re-use
    info: dict[str, Any]  # entry.json
    built: bool = False  # built by this process (else re-used)

    def describe(self) -> str:
        """``train 20000 questions (81,912,345 tokens), val ...``."""
        return ", ".join(f"{split} {len(part.questions)} questions ({part.tokens:,} tokens)"
                         for split, part in self.splits.items())

    def replay_warnings(self) -> None:
        """Log again the warnings its build logged (skipped records, truncated traces), as a fresh run would."""
        for name, level, message in self.warnings:
            logging.getLogger(name).log(level, "%s", message)


def open_entry(directory: Path, quiet: bool = False) -> CacheEntry | None:
    """The entry at ``directory``, or None when there is none (or it is unreadable, said unless ``quiet``: it is
    then rebuilt)."""
    info_path = directory / "entry.json"
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        if info.get("format") != CACHE_FORMAT:
            return None
        with open(directory / "questions.pkl", "rb") as file:
            stored = pickle.load(file)
        splits = {}
        for split, part in stored["splits"].items():
            tokens = SplitTokens(directory, split)
            questions = [CachedQuestion(qid, answer, sources, columns, location, tokens, first)
                         for qid, answer, sources, columns, location, first in part["questions"]]
            splits[split] = CachedSplit(questions, part["validation"], int(tokens.spans[-1]))
    except (OSError, ValueError, KeyError, TypeError, EOFError, pickle.UnpicklingError, AttributeError) as error:
        if quiet:
            return None
        log.warning("token cache entry %s is unreadable (%s: %s); building it again", directory,
                    type(error).__name__, error)
        return None
    return CacheEntry(directory, splits, stored["warnings"], info)


# ---- building an entry ---------------------------------------------------------------------
def build_entry(directory: Path, read_splits: Callable[[], dict[str, list[QuestionRecord]]],
                validation: dict[str, SplitValidation], tokenizer, options: RenderOptions, num_proc: int,
                identity: dict[str, Any], origin: str, chunk_characters: int = CHUNK_CHARACTERS) -> CacheEntry:
    """Read the splits (``read_splits``), render them (``num_proc`` processes) into a temporary directory beside
    ``directory`` and publish it there; returns the entry. ``validation``: the splits' counts, completed here
    (``read_splits`` adds the reading's). ``origin``: what set the cache dir, for errors."""
    tmp = _temporary_directory(directory, origin)
    try:
        start = time.perf_counter()
        with _captured_warnings() as warnings, worker_pool(tokenizer, num_proc) as pool:
            splits = read_splits()
            stored = {}
            for split in list(splits):
                records = splits.pop(split)  # rendered: the records can go
                part = validation.setdefault(split, SplitValidation())
                stored[split] = {"questions": _write_split(tmp, split, records, part, tokenizer, options, pool,
                                                           chunk_characters), "validation": part}
                warn_overlong(split, part, options.max_length)
        with open(tmp / "questions.pkl", "wb") as file:
            pickle.dump({"splits": stored, "warnings": warnings}, file, protocol=pickle.HIGHEST_PROTOCOL)
            _sync(file)
        info = {"format": CACHE_FORMAT, "identity": identity, "num_proc": num_proc,
                "build_seconds": round(time.perf_counter() - start, 3),
                "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "splits": {split: {"questions": len(part["questions"])} for split, part in stored.items()}}
        with open(tmp / "entry.json", "w") as file:
            json.dump(info, file, indent=1, default=str)
            _sync(file)
        publish(tmp, directory)
    except OSError as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if not _cache_write_error(error, directory.parent):
            raise
        raise ConfigError(f"cannot write the token cache entry {directory} ({type(error).__name__}: {error}); free "
                          f"space or give a writable dir ({origin}; data.init_args.cache_dir or ${CACHE_DIR_ENV}), "
                          "or turn the cache off with data.init_args.cache=false") from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    entry = open_entry(directory)
    if entry is None:
        raise RuntimeError(f"the token cache entry {directory} just built cannot be read back")
    entry.built = True
    return entry


def _cache_write_error(error: OSError, cache_dir: Path) -> bool:
    """Whether ``error`` is the cache dir's (full, read-only, not permitted), not the data's."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    return error.filename is not None and os.path.abspath(error.filename).startswith(os.path.abspath(cache_dir))


def publish(tmp: Path, directory: Path) -> None:
    """Rename the complete entry ``tmp`` to ``directory`` (atomic). If another builder got there first, its entry
    stays and ``tmp`` is removed; an unreadable one in the way is moved aside and removed."""
    try:
        os.rename(tmp, directory)
        return
    except OSError:
        if not directory.exists():
            raise
    if open_entry(directory, quiet=True) is not None:  # a concurrent builder's: the same content
        shutil.rmtree(tmp, ignore_errors=True)
        return
    stale = Path(tempfile.mkdtemp(prefix=directory.name + ".stale-", dir=directory.parent))
    os.replace(directory, stale / "entry")
    os.rename(tmp, directory)
    shutil.rmtree(stale, ignore_errors=True)


def _temporary_directory(directory: Path, origin: str) -> Path:
    """``<entry>.tmp-<host>-<pid>-<random>`` beside the entry (made with the umask's permissions, as the entry)."""
    tmp = directory.with_name(f"{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        return tmp
    except OSError as error:
        raise ConfigError(f"the token cache dir {directory.parent} is not writable ({type(error).__name__}: "
                          f"{error}); it is {origin}: give a writable dir with data.init_args.cache_dir or "
                          f"${CACHE_DIR_ENV}, or turn the cache off with data.init_args.cache=false") from error


def _write_split(tmp: Path, split: str, records: list[QuestionRecord], validation: SplitValidation, tokenizer,
                 options: RenderOptions, pool, chunk_characters: int) -> list[tuple]:
    """Render ``records`` chunk by chunk into ``<split>.tokens.npy`` and ``<split>.spans.npy``; returns each kept
    question's metadata ``(id, answer, sources, columns, location, first span)``."""
    tasks = ((split, chunk, options) for chunk in chunk_records(records, chunk_characters))
    chunks = pool.imap(render_task, tasks) if pool is not None else (
        render_chunk(chunk, tokenizer, split, options) for _, chunk, _ in tasks)
    questions: list[tuple] = []
    tokens = ArrayWriter(tmp / f"{split}.tokens.npy", np.int32)
    spans = ArrayWriter(tmp / f"{split}.spans.npy", np.int64)
    with tokens, spans:
        spans.write(np.zeros(1, dtype=np.int64))
        for chunk in chunks:
            if isinstance(chunk, ChunkFailure):
                raise RecordError(chunk.message, chunk.reason)
            for message in chunk.skipped:
                logging.getLogger(SKIP_LOGGER).warning("skipped bad record: %s", message)
            validation.add(chunk.validation)
            questions += [(*meta, first + spans.count - 1) for *meta, first in chunk.questions]
            spans.write(tokens.count + np.cumsum(chunk.span_lengths))
            tokens.write(chunk.tokens)
    validation.questions = len(questions)
    return questions


@contextlib.contextmanager
def _captured_warnings():
    """The warnings ``forklight.data`` loggers emit meanwhile, as ``(logger, level, message)``, to be kept with
    the entry (:meth:`CacheEntry.replay_warnings`)."""
    captured: list[tuple[str, int, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            captured.append((record.name, record.levelno, record.getMessage()))

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("forklight.data")
    logger.addHandler(handler)
    try:
        yield captured
    finally:
        logger.removeHandler(handler)


class ArrayWriter:
    """A 1-D ``.npy`` file written piece by piece: a header slot sized for any length, filled in at the end."""

    HEADER_BYTES = 128  # numpy's 1.0 header of a 1-D array, padded for growth: 128 bytes up to 10^20 elements

    def __init__(self, path: Path, dtype) -> None:
        self.path, self.dtype, self.count = path, np.dtype(dtype), 0
        self.file = open(path, "wb")
        self.file.write(b"\0" * self.HEADER_BYTES)

    def write(self, values: np.ndarray) -> None:
        if values.dtype != self.dtype:
            raise TypeError(f"{self.path.name}: got {values.dtype} values for a {self.dtype} array")
        values.tofile(self.file)
        self.count += values.size

    def __enter__(self) -> ArrayWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if kind is None:
                self.file.seek(0)
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                          "shape": (self.count,)}
                np.lib.format.write_array_header_1_0(self.file, header)
                if self.file.tell() != self.HEADER_BYTES:
                    raise RuntimeError(f"{self.path}: the .npy header is {self.file.tell()} bytes, not "
                                       f"{self.HEADER_BYTES}")
                _sync(self.file)
        finally:
            self.file.close()


def _sync(file) -> None:
    """Flush ``file`` to disk before the entry is published (a crash then leaves no renamed, half-written entry)."""
    file.flush()
    os.fsync(file.fileno())
