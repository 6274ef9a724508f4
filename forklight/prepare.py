"""``forklight prepare -c configs/prepare/s1k.yaml``: a multi-trace corpus -> a grouped parquet for ``forklight fit``.

Reads a corpus in any layout the data module reads (``fields``, ``layout``, ``think``, ``on_bad_record``, ``split``:
copy them from the data config), then, question by question:

1. (``sample``) appends teachers' sampled traces (``forklight.teachers``), resuming from ``<output>.samples/``;
2. verifies each trace's final answer (the text after ``</think>``, or the whole trace) against the gold answer
   with ``verifier`` (``model.verifier``'s spec): a wrong trace (score <= 0), one the verifier cannot score (None)
   and a question without a gold answer are dropped;
3. drops exact duplicates (equal after collapsing whitespace) and near-duplicates (Jaccard similarity of their
   word 5-gram sets >= ``near_duplicate``) within the question, keeping the first;
4. keeps the question when ``min_traces`` traces survive, and caps them at ``max_traces``, round-robin over the
   sources so the set stays diverse.

It writes ``output`` (grouped layout: ``id``, ``prompt`` and/or ``messages``, ``answer``, ``traces: [{text, source}]``
and the record's other columns, for verifiers) atomically, and ``report.json`` / ``report.md``: what was dropped,
why, from which source, and the kept traces' lengths. Steps 2-4 run in ``num_proc`` worker processes over chunks
of questions; each worker's verifier runs in that worker's main thread, where math-verify's timeouts work.
``docs/prepare.md`` describes every option. Also ``python -m forklight.prepare``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Any

from forklight.data.layouts import ThinkMarkup, final_answer
from forklight.data.records import LAYOUTS, ON_BAD_RECORD, FieldNames, LoadReport, QuestionRecord, Trace, load_records
from forklight.errors import ConfigError, UserError

from forklight.teachers import TeacherSampling

OUTPUT_FIELDS = ("id", "prompt", "messages", "answer", "traces")  # the grouped layout's own names
SHINGLE_WORDS = 5  # near-duplicates: Jaccard similarity of word 5-gram sets (Lee et al. 2022, "Deduplicating...")
# why prepare drops a trace, in the order of its steps (the reader's reasons, e.g. a keep flag's column, come first)
TRACE_REASONS = ("missing_answer", "unscorable", "wrong", "duplicate", "near_duplicate", "too_few_traces",
                 "over_max_traces")
CHUNK_QUESTIONS = 32  # questions per task handed to a worker (and per progress update)


@dataclass
class PrepareConfig:
    """Curate a multi-trace corpus into a grouped parquet that ``forklight fit`` reads (``docs/prepare.md``).

    Args:
        input: the corpus: a .jsonl/.json/.parquet file, a local dir or a ``datasets`` name.
        output: the parquet to write (``--data.init_args.train=<output>`` then trains on it).
        fields: field names of the corpus, as ``data.fields``.
        layout: ``auto``, ``grouped``, ``flat``, ``columns`` or ``chat``, as ``data.layout``.
        think: keep or strip the traces' think markup, as ``data.think`` (applied once, here: read the output
            with the default ``data.think``).
        on_bad_record: ``error`` stops at the first bad row; ``skip`` skips and counts it (in the report).
        split: the split of a ``datasets`` name.
        sample: sample more traces from teacher models before verification (``forklight.teachers``); null = off.
        verifier: scores each trace's final answer against the gold answer, as ``model.verifier`` (``math``,
            ``exact_integer``, ``choice``, ``package.module:function``, ...); null = keep every trace unverified.
        near_duplicate: drop a trace whose word 5-gram set has Jaccard similarity >= this with an earlier kept
            trace of its question; null = exact duplicates only.
        min_traces: keep a question only with at least this many traces left (the method learns from a set).
        max_traces: keep at most this many traces per question, taking sources in turn; null = all.
        drop_columns: columns of the corpus not to write (the rest are kept, for verifiers).
        tokenizer: also report lengths in this tokenizer's tokens (a hub name, a path or ``toy``); null = chars only.
        num_proc: worker processes (1 = in this process).
        progress: show a progress bar on stderr.
        report: directory of ``report.json`` and ``report.md`` (default: the output's directory).
        overwrite: replace an existing output.
    """

    input: str
    output: str
    fields: FieldNames = field(default_factory=FieldNames)
    layout: str = "auto"
    think: ThinkMarkup = field(default_factory=ThinkMarkup)
    on_bad_record: str = "error"
    split: str = "train"
    sample: TeacherSampling | None = None
    verifier: str | dict | list[str | dict] | None = "math"
    near_duplicate: float | None = 0.9
    min_traces: int = 2
    max_traces: int | None = None
    drop_columns: list[str] = field(default_factory=list)
    tokenizer: str | None = None
    num_proc: int = 1
    progress: bool = True
    report: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        for key, value, allowed in (("layout", self.layout, LAYOUTS), ("on_bad_record", self.on_bad_record,
                                                                        ON_BAD_RECORD)):
            if value not in allowed or value == "prompts":
                choices = ", ".join(repr(a) for a in allowed if a != "prompts")
                raise ConfigError(f"{key} must be one of {choices}, got {value!r}")
        if not self.output.endswith(".parquet"):
            raise ConfigError(f"output must end in .parquet (forklight fit reads a file by its suffix), got {self.output!r}")
        if self.min_traces < 1:
            raise ConfigError(f"min_traces must be >= 1, got {self.min_traces}")
        if self.max_traces is not None and self.max_traces < self.min_traces:
            raise ConfigError(f"max_traces={self.max_traces} is below min_traces={self.min_traces}; raise it or set null")
        if self.near_duplicate is not None and not 0 < self.near_duplicate <= 1:
            raise ConfigError(f"near_duplicate must be in (0, 1] (a Jaccard similarity) or null, got {self.near_duplicate}")
        if self.num_proc < 1:
            raise ConfigError(f"num_proc must be >= 1, got {self.num_proc}")


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


# ---- the report ---------------------------------------------------------------------------------------------------
@dataclass
class LengthStats:
    mean: float
    median: float
    p90: float  # nearest rank: the ceil(0.9 n)-th smallest
    max: int


def length_stats(values: list[int]) -> LengthStats | None:
    if not values:
        return None
    ordered = sorted(values)
    return LengthStats(round(statistics.fmean(ordered), 2), statistics.median(ordered),
                       ordered[math.ceil(0.9 * len(ordered)) - 1], ordered[-1])


@dataclass
class SourceReport:
    """One source's traces: read = kept + the sum of dropped (the reader's drops included)."""

    read: int = 0  # traces the reader saw, plus those sampled
    sampled: int = 0  # samples of this teacher (``sample``), those it left out (e.g. incomplete) included
    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> traces
    acceptance_rate: float | None = None  # kept / read
    chars: LengthStats | None = None  # of the kept traces
    tokens: LengthStats | None = None  # of the kept traces, with a tokenizer


@dataclass
class PrepareReport:
    """What ``forklight prepare`` did; written as ``report.json`` and ``report.md``."""

    input: str
    output: str
    forklight_version: str
    options: dict[str, Any]
    questions_read: int  # questions the reader found, those its drops emptied included
    questions_kept: int
    questions_dropped: dict[str, int]  # reason -> questions
    traces_per_question: dict[int, int]  # kept questions: traces -> questions
    sources: dict[str, SourceReport]
    skipped_rows: int  # rows the reader skipped (on_bad_record: skip)
    skip_reasons: dict[str, int]
    skipped_examples: list[str]  # the first few skip messages
    dropped_columns: dict[str, str]  # column -> why it was not written
    sampling: Any = None  # the teachers' own report (``sample``)


def build_report(config: PrepareConfig, loaded: LoadReport, sampled: Counter[str], curated: list[CuratedQuestion],
                 dropped_columns: dict[str, str], sampling: Any = None) -> PrepareReport:
    from forklight import __version__

    sources: dict[str, SourceReport] = {}

    def source(name: str) -> SourceReport:
        return sources.setdefault(name, SourceReport())

    for name, count in loaded.traces_read.items():
        source(name).read += count
    teachers_dropped = Counter(getattr(sampling, "dropped", None) or {})  # samples a teacher left out (incomplete)
    for name, count in (sampled + Counter(name for (_, name) in teachers_dropped.elements())).items():
        source(name).read += count
        source(name).sampled += count
    dropped: Counter[tuple[str, str]] = Counter(loaded.dropped_traces) + teachers_dropped
    chars: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    for question in curated:
        dropped.update(question.dropped_traces)
        for index, trace in enumerate(question.record.traces):
            source(source_name(trace)).kept += 1
            chars.setdefault(source_name(trace), []).append(len(trace.text))
            if question.token_lengths is not None:
                tokens.setdefault(source_name(trace), []).append(question.token_lengths[index])
    for (reason, name), count in sorted(dropped.items(), key=lambda item: (_reason_order(item[0][0]), item[0])):
        source(name).dropped[reason] = count
    for name, stats in sources.items():
        stats.acceptance_rate = round(stats.kept / stats.read, 4) if stats.read else None
        stats.chars, stats.tokens = length_stats(chars.get(name, [])), length_stats(tokens.get(name, []))
    questions_dropped = Counter(q.dropped_because for q in curated if q.dropped_because is not None)
    if loaded.emptied:
        questions_dropped["no_kept_traces"] = loaded.emptied  # the reader's flags left none
    kept = [q for q in curated if q.dropped_because is None]
    return PrepareReport(
        input=config.input, output=config.output, forklight_version=__version__, options=_plain(config),
        questions_read=len(curated) + loaded.emptied, questions_kept=len(kept),
        questions_dropped=dict(sorted(questions_dropped.items())),
        traces_per_question=dict(sorted(Counter(len(q.record.traces) for q in kept).items())),
        sources=dict(sorted(sources.items())), skipped_rows=len(loaded.skipped),
        skip_reasons=dict(sorted(loaded.skip_reasons.items())), skipped_examples=loaded.skipped[:5],
        dropped_columns=dropped_columns, sampling=_plain(sampling))


def _reason_order(reason: str) -> int:
    return TRACE_REASONS.index(reason) + 1 if reason in TRACE_REASONS else 0


def _plain(value: Any) -> Any:
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else value


def _stats_cell(stats: LengthStats | None) -> str:
    return "–" if stats is None else f"{stats.mean:.0f} / {stats.median:.0f} / {stats.p90} / {stats.max}"


def report_markdown(report: PrepareReport) -> str:
    """The report as tables: questions, traces per question, and per source."""
    options = {k: v for k, v in report.options.items() if k not in ("input", "output", "fields", "think", "sample")}
    lines = [f"# forklight prepare: `{report.input}` -> `{report.output}`", "",
             f"forklight {report.forklight_version}; " + ", ".join(f"{k}: {json.dumps(v)}" for k, v in options.items()),
             "", "| questions read | kept | dropped |", "|---|---|---|",
             f"| {report.questions_read} | {report.questions_kept} | {report.questions_read - report.questions_kept} |",
             ""]
    if report.questions_dropped:
        lines += ["| question dropped because | questions |", "|---|---|"]
        lines += [f"| {reason} | {count} |" for reason, count in report.questions_dropped.items()] + [""]
    lines += ["| traces per kept question | questions |", "|---|---|"]
    lines += [f"| {traces} | {count} |" for traces, count in report.traces_per_question.items()] + [""]
    reasons = sorted({reason for stats in report.sources.values() for reason in stats.dropped},
                     key=lambda reason: (_reason_order(reason), reason))
    head = ["source", "read", "kept", "acceptance", *reasons, "chars mean / median / p90 / max"]
    with_tokens = any(stats.tokens is not None for stats in report.sources.values())
    head += ["tokens mean / median / p90 / max"] if with_tokens else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stats in report.sources.items():
        rate = "–" if stats.acceptance_rate is None else f"{100 * stats.acceptance_rate:.1f}%"
        row = [name, str(stats.read), str(stats.kept), rate, *(str(stats.dropped.get(r, 0)) for r in reasons),
               _stats_cell(stats.chars)] + ([_stats_cell(stats.tokens)] if with_tokens else [])
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if report.skipped_rows:
        shown = ", ".join(f"{count} {reason}" for reason, count in report.skip_reasons.items())
        lines += [f"{report.skipped_rows} rows skipped ({shown}); first: {report.skipped_examples[0]}", ""]
    if report.dropped_columns:
        lines += ["Columns not written: " + "; ".join(f"`{c}` ({why})" for c, why in report.dropped_columns.items()), ""]
    return "\n".join(lines)


# ---- writing ------------------------------------------------------------------------------------------------------
def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def prepared_table(records: list[QuestionRecord], drop_columns: list[str], metadata: dict[str, str], where: str):
    """``(table, dropped columns)``: the grouped layout, then the records' other columns in first-seen order
    (``where``: the input, named in errors)."""
    import pyarrow as pa

    arrays = {"id": pa.array([r.id for r in records], pa.string())}
    if any(r.prompt is not None for r in records):
        arrays["prompt"] = pa.array([r.prompt for r in records], pa.string())
    if any(r.messages is not None for r in records):
        arrays["messages"] = pa.array([r.messages for r in records])  # list<struct<role, content, ...>>
    arrays["answer"] = pa.array([r.answer for r in records], pa.string())
    trace_type = pa.list_(pa.struct([("text", pa.string()), ("source", pa.string())]))
    arrays["traces"] = pa.array([[{"text": t.text, "source": t.source} for t in r.traces] for r in records], trace_type)
    dropped: dict[str, str] = {}
    for name in dict.fromkeys(key for r in records for key in r.columns):
        if name in drop_columns:
            dropped[name] = "drop_columns"
        elif name in OUTPUT_FIELDS:
            dropped[name] = "its name is one of the output's own fields"
        else:
            try:
                arrays[name] = pa.array([r.columns.get(name) for r in records])
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as error:
                raise UserError(f"{where}: column '{name}' cannot be written to parquet ({error}); its "
                                "values differ in type between questions: add it to drop_columns") from error
    return pa.table(arrays).replace_schema_metadata(metadata), dropped


def prepare(config: PrepareConfig) -> PrepareReport:
    """Read, (sample,) curate, write the parquet and the report; returns the report."""
    import pyarrow.parquet as pq

    if os.path.exists(config.output) and not config.overwrite:
        raise ConfigError(f"output={config.output!r} already exists; give another output, or set overwrite: true "
                          "(--overwrite=true) to replace it")
    build_verifier(config.verifier)  # a bad value fails here, before any reading
    build_tokenizer(config.tokenizer)
    records, loaded = load_records(config.input, fields=config.fields, layout=config.layout,
                                   on_bad_record=config.on_bad_record, split=config.split, think=config.think)
    print(f"forklight prepare: {loaded.summary()}", file=sys.stderr)
    before = Counter(source_name(t) for r in records for t in r.traces)
    sampling = None
    if config.sample is not None:  # teachers' traces join the corpus's before verification
        from forklight.teachers import sample_traces  # loads models: only when sampling

        records, sampling = sample_traces(records, config.sample, store_dir=f"{config.output}.samples",
                                          progress=config.progress)
    sampled = Counter(source_name(t) for r in records for t in r.traces) - before
    curated = curate_all(records, config)
    kept = [q.record for q in curated if q.dropped_because is None]
    options = json.dumps(_plain(config), default=str)
    table, dropped_columns = prepared_table(kept, config.drop_columns, {"forklight.prepare": options}, config.input)
    report = build_report(config, loaded, sampled, curated, dropped_columns, sampling)
    report_dir = config.report or os.path.dirname(os.path.abspath(config.output))
    os.makedirs(report_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(config.output)), exist_ok=True)
    markdown = report_markdown(report)
    report_json = json.dumps(asdict(report), indent=2, default=str) + "\n"
    _write_atomically(os.path.join(report_dir, "report.json"), lambda path: _write_text(path, report_json))
    _write_atomically(os.path.join(report_dir, "report.md"), lambda path: _write_text(path, markdown))
    print(markdown)
    if not kept:
        raise UserError(f"{config.input}: no question kept ({', '.join(f'{n} {r}' for r, n in report.questions_dropped.items())}"
                        f"), so {config.output} was not written; see {report_dir}/report.md, and check min_traces, "
                        "verifier and the answer field (fields.answer)")
    _write_atomically(config.output, lambda path: pq.write_table(table, path))
    print(f"forklight prepare: {report.questions_kept} questions -> {config.output}", file=sys.stderr)
    return report


# ---- the command line ---------------------------------------------------------------------------------------------
def prepare_parser():
    """``forklight prepare``'s parser: :class:`PrepareConfig`'s fields, ``-c`` configs that stack, ``--key=value``."""
    from jsonargparse import ActionConfigFile, ArgumentParser

    parser = ArgumentParser(prog="forklight prepare", parser_mode="omegaconf",
                            description="Curate a multi-trace corpus into a grouped parquet for forklight fit.")
    parser.add_argument("-c", "--config", action=ActionConfigFile, help="a YAML config; several stack, later ones win")
    parser.add_class_arguments(PrepareConfig, as_group=False)
    return parser


def prepare_cli(args: list[str] | None = None) -> PrepareReport:
    """``forklight prepare`` on ``args`` (default ``sys.argv[1:]``, without the word ``prepare``)."""
    import re

    parser = prepare_parser()
    values = parser.parse_args(args)
    try:
        built = parser.instantiate(values)
    except ConfigError as error:  # data.think's own check names data.think.*: here it is think.*
        raise ConfigError(re.sub(r"\bdata\.(init_args\.)?(?=think|fields|layout|on_bad_record)", "", str(error))) from error
    options = {key: getattr(built, key) for key in PrepareConfig.__dataclass_fields__}
    return prepare(PrepareConfig(**options))


if __name__ == "__main__":
    from forklight.cli import main

    main(["prepare", *sys.argv[1:]], exit_on_error=True)
