"""``forklight prepare``'s report: questions and traces read, kept and dropped (by reason, per source) and the
kept traces' lengths, as :class:`PrepareReport` (written as ``report.json``) and :func:`report_markdown`
(``report.md``)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

from forklight.data.records import LoadReport
from forklight.prepare.config import PrepareConfig
from forklight.prepare.curate import CuratedQuestion, source_name

# why prepare drops a trace, in the order of its steps (the reader's reasons, e.g. a keep flag's column, come first)
TRACE_REASONS = ("missing_answer", "unscorable", "wrong", "duplicate", "near_duplicate", "too_few_traces",
                 "over_max_traces")


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
