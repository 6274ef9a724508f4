"""Curation: each question's traces verified against the gold answer, deduplicated (exact, and word 5-gram
near-duplicates) and selected (``min_traces`` .. ``max_traces``, round-robin over sources); :func:`curate_all` runs it
over every question in ``num_proc`` spawned worker processes (top-level functions here, so a worker can import them).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from forklight.data.layouts import ThinkMarkup, final_answer
from forklight.data.records import QuestionRecord, Trace
from forklight.errors import ConfigError, UserError
from forklight.prepare.config import PrepareConfig

SHINGLE_WORDS = 5  # near-duplicates: Jaccard similarity of word 5-gram sets (Lee et al. 2022, "Deduplicating...")
CHUNK_QUESTIONS = 32  # questions per task handed to a worker (and per progress update)


# ---- one question: verify, deduplicate, select (pure, but for the verifier's own state) ---------------------------
@dataclass
class CuratedQuestion:
    """What curation did to one question."""

    record: QuestionRecord  # with its kept traces only (none when the question is dropped)
    dropped_because: str | None  # why the whole question was dropped; None = kept
    dropped_traces: Counter[tuple[str, str]]  # (reason, source or "-") -> traces
    token_lengths: list[int] | None = None  # per kept trace, with a tokenizer


def source_name(trace: Trace) -> str:
    return trace.source if trace.source is not None else "-"


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def shingles(text: str, size: int = SHINGLE_WORDS) -> frozenset[tuple[str, ...]]:
    """The set of ``size``-word windows of whitespace-separated ``text`` (the whole text when it is shorter)."""
    words = text.split()
    return frozenset(tuple(words[i:i + size]) for i in range(max(1, len(words) - size + 1)))


def jaccard(first: frozenset, second: frozenset) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    union = len(first | second)
    return len(first & second) / union if union else 1.0


def drop_duplicates(traces: list[Trace], near_duplicate: float | None) -> tuple[list[Trace], list[tuple[Trace, str]]]:
    """``(kept, [(dropped, "duplicate" | "near_duplicate")])``: a trace equal to an earlier kept one after collapsing
    whitespace, or whose shingle set's Jaccard similarity with one is >= ``near_duplicate``; the first is kept."""
    kept: list[Trace] = []
    seen: set[str] = set()
    kept_shingles: list[frozenset] = []
    dropped = []
    for trace in traces:
        text = normalise_whitespace(trace.text)
        if text in seen:
            dropped.append((trace, "duplicate"))
            continue
        mine = shingles(text) if near_duplicate is not None else frozenset()
        if near_duplicate is not None and any(jaccard(mine, other) >= near_duplicate for other in kept_shingles):
            dropped.append((trace, "near_duplicate"))
            continue
        seen.add(text)
        kept_shingles.append(mine)
        kept.append(trace)
    return kept, dropped


def select_traces(traces: list[Trace], max_traces: int | None) -> tuple[list[Trace], list[Trace]]:
    """``(kept, over)``: at most ``max_traces``, taken round-robin over the sources in order of first appearance
    (a1 a2 a3 b1 c1, 3 -> a1 b1 c1), kept in their original order."""
    if max_traces is None or len(traces) <= max_traces:
        return traces, []
    by_source: dict[str, list[int]] = {}
    for index, trace in enumerate(traces):
        by_source.setdefault(source_name(trace), []).append(index)
    chosen: set[int] = set()
    for turn in range(len(traces)):
        for indices in by_source.values():
            if turn < len(indices) and len(chosen) < max_traces:
                chosen.add(indices[turn])
    return [t for i, t in enumerate(traces) if i in chosen], [t for i, t in enumerate(traces) if i not in chosen]


def verify_traces(record: QuestionRecord, verifier: Callable, think: ThinkMarkup) -> list[float | None]:
    """The verifier's score of each trace's final answer (:func:`final_answer`) against the gold answer."""
    count = len(record.traces)
    completions = [final_answer(trace.text, think.open, think.close) for trace in record.traces]
    columns = {key: [value] * count for key, value in record.columns.items()}
    scores = list(verifier(completions, [record.answer] * count, **columns))
    if len(scores) != count:
        raise UserError(f"{record.location}: verifier returned {len(scores)} scores for {count} traces; "
                        "a verifier returns one score (or None) per completion")
    return scores


def curate_question(record: QuestionRecord, config: PrepareConfig, verifier: Callable | None) -> CuratedQuestion:
    """Verify, deduplicate and select one question's traces; every trace dropped is counted by reason and source."""
    dropped: Counter[tuple[str, str]] = Counter()

    def drop(traces: list[Trace], reason: str) -> None:
        dropped.update((reason, source_name(trace)) for trace in traces)

    def dropped_question(traces: list[Trace], reason: str) -> CuratedQuestion:
        drop(traces, reason)
        return CuratedQuestion(replace(record, traces=[]), reason, dropped)

    traces = record.traces
    if verifier is not None:
        if record.answer is None:
            return dropped_question(traces, "missing_answer")
        scores = verify_traces(record, verifier, config.think)
        drop([t for t, s in zip(traces, scores) if s is None], "unscorable")
        drop([t for t, s in zip(traces, scores) if s is not None and float(s) <= 0], "wrong")
        if all(score is None for score in scores):  # the gold answer, most likely: reported as such
            return CuratedQuestion(replace(record, traces=[]), "unscorable_answer", dropped)
        traces = [t for t, s in zip(traces, scores) if s is not None and float(s) > 0]
    traces, duplicates = drop_duplicates(traces, config.near_duplicate)
    for trace, reason in duplicates:
        drop([trace], reason)
    if len(traces) < config.min_traces:
        return dropped_question(traces, "too_few_traces")
    traces, over = select_traces(traces, config.max_traces)
    drop(over, "over_max_traces")
    return CuratedQuestion(replace(record, traces=traces), None, dropped)


def curate_chunk(records: list[QuestionRecord], config: PrepareConfig, verifier: Callable | None,
                 tokenizer: Any = None) -> list[CuratedQuestion]:
    curated = [curate_question(record, config, verifier) for record in records]
    if tokenizer is not None:
        for question in curated:
            question.token_lengths = [len(tokenizer(t.text, add_special_tokens=False)["input_ids"])
                                      for t in question.record.traces]
    return curated


# ---- building the verifier and tokenizer (once per process) -------------------------------------------------------
def build_verifier(spec: Any) -> Callable | None:
    if spec is None:
        return None
    from forklight.rewards import resolve_verifier

    try:
        return resolve_verifier(spec)[0]
    except (ValueError, ImportError) as error:
        raise ConfigError(str(error).replace("model.verifier", "verifier")) from error


def build_tokenizer(name: str | None) -> Any:
    if name is None:
        return None
    from forklight.data.rendering import load_tokenizer

    try:
        return load_tokenizer(name)
    except ConfigError as error:
        reason = str(error.__cause__ or error).strip().splitlines()[0]
        raise ConfigError(f"tokenizer={name!r} cannot be loaded ({reason}); give a tokenizer's hub name or local "
                          "path, 'toy', or null") from error


_WORKER: dict[str, Any] = {}  # a worker process's config, verifier and tokenizer


def _start_worker(config: PrepareConfig) -> None:
    _WORKER.update(config=config, verifier=build_verifier(config.verifier), tokenizer=build_tokenizer(config.tokenizer))


def _curate_in_worker(records: list[QuestionRecord]) -> list[CuratedQuestion]:
    return curate_chunk(records, _WORKER["config"], _WORKER["verifier"], _WORKER["tokenizer"])


def curate_all(records: list[QuestionRecord], config: PrepareConfig) -> list[CuratedQuestion]:
    """:func:`curate_question` on every record, in ``config.num_proc`` processes, in the records' order."""
    from tqdm import tqdm

    chunks = [records[i:i + CHUNK_QUESTIONS] for i in range(0, len(records), CHUNK_QUESTIONS)]
    bar = tqdm(total=len(records), unit="question", desc="forklight prepare", file=sys.stderr,
               disable=not config.progress)
    results: list[list[CuratedQuestion]] = [[] for _ in chunks]
    try:
        if config.num_proc == 1:
            verifier, tokenizer = build_verifier(config.verifier), build_tokenizer(config.tokenizer)
            for index, chunk in enumerate(chunks):
                results[index] = curate_chunk(chunk, config, verifier, tokenizer)
                bar.update(len(chunk))
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor, as_completed

            # spawn: a fresh interpreter per worker (no forked torch threads); tasks run in its main thread
            pool = ProcessPoolExecutor(config.num_proc, mp_context=multiprocessing.get_context("spawn"),
                                       initializer=_start_worker, initargs=(config,))
            try:
                futures = {pool.submit(_curate_in_worker, chunk): index for index, chunk in enumerate(chunks)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(len(chunks[futures[future]]))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
    finally:
        bar.close()
    return [question for chunk in results for question in chunk]
