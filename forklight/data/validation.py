"""Validating records at setup: rendering each question once, overlong traces, gold answers, the counts.

:func:`render_questions` tokenises a split's records into :class:`RenderedQuestion` s, refusing or
skipping (``data.on_bad_record``) questions with too few traces or a prompt too long for a row, and
truncating, skipping or refusing traces whose row is longer than ``data.max_length``
(``data.overlong``), under the options of a :class:`RenderOptions`; :func:`render_records` does the same to
a chunk of a split (the token cache, ``forklight.data.cache``, renders in chunks and in worker processes).
:func:`check_gold_answers` keeps the questions whose gold answer the model's verifier can read. What each did
to a split is counted in a :class:`SplitValidation`;
:func:`validation_summary` and :func:`validation_counts` report those for the log and the logger.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from forklight.data.records import QuestionRecord, RecordError
from forklight.data.rendering import RenderedQuestion, end_of_turn_id, render_prompt_ids

log = logging.getLogger(__name__)

OVERLONG = ("truncate", "skip", "error")  # data.overlong: what to do with a trace whose row exceeds data.max_length


def format_counts(counts: Counter[str]) -> str:
    """``"2 malformed_json, 1 overlong"``: counts per reason, reasons in order."""
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


@dataclass
class SplitValidation:
    """What validation did to one split: kept questions, skips per reason, overlong traces, sampling."""

    questions: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows or questions skipped
    truncated_traces: int = 0  # traces cut to data.max_length (data.overlong=truncate)
    truncated_tokens: int = 0  # tokens cut off them
    dropped_traces: int = 0  # overlong traces left out (data.overlong=skip)
    dropped_tokens: int = 0  # tokens in them
    sampled_questions: int = 0  # questions with more traces than data.max_traces (that many drawn per epoch)
    # traces the data's own keep flags / finish reasons / data.think left out, per reason (forklight.data.layouts)
    left_out: Counter[str] = field(default_factory=Counter)

    def summary(self) -> str:
        """e.g. ``"64 questions; skipped: 2 malformed_json; 3 traces truncated to data.max_length (812 tokens cut)"``."""
        parts = [f"{self.questions} questions"]
        if self.skipped:
            parts.append("skipped: " + format_counts(self.skipped))
        if self.truncated_traces:
            parts.append(f"{self.truncated_traces} traces truncated to data.max_length ({self.truncated_tokens} tokens cut)")
        if self.dropped_traces:
            parts.append(f"{self.dropped_traces} overlong traces skipped ({self.dropped_tokens} tokens)")
        if self.left_out:
            parts.append(f"traces left out by the data's flags or data.think: {format_counts(self.left_out)}")
        if self.sampled_questions:
            parts.append(f"{self.sampled_questions} questions with more traces than data.max_traces (sampled per epoch)")
        return "; ".join(parts)

    def add(self, other: SplitValidation) -> None:
        """Add ``other``'s counts to these (a split rendered in chunks: ``forklight.data.cache``)."""
        for name in (item.name for item in fields(self)):
            mine = getattr(self, name)
            if isinstance(mine, Counter):
                mine.update(getattr(other, name))
            else:
                setattr(self, name, mine + getattr(other, name))


@dataclass(frozen=True)
class RenderOptions:
    """The ``data.*`` options that decide how records are rendered and validated (``ForkDataModule``'s of the same
    names; ``max_traces`` is the effective one: ``data.max_traces`` or ``num_fork_tokens``)."""

    prompt_template: str | None = None
    system_prompt: str | None = None
    end_token: str | None = None
    max_length: int = 2048
    overlong: str = "truncate"
    min_traces: int = 1
    max_traces: int | None = None
    on_bad_record: str = "error"


ENCODE_BATCH = 64  # records whose traces go to the tokenizer in one call (a fast tokenizer encodes a batch natively)


def render_questions(records: list[QuestionRecord], tokenizer, split: str, validation: SplitValidation,
                     options: RenderOptions) -> list[RenderedQuestion]:
    """Tokenise ``records`` of ``split`` once, counting in ``validation`` what was skipped or cut, and warn
    about the split's overlong traces.

    A bad record raises :class:`RecordError` under ``on_bad_record="error"``, else it is skipped and counted.
    """
    questions = render_records(records, tokenizer, split, validation, options)
    validation.questions = len(questions)
    warn_overlong(split, validation, options.max_length)
    return questions


def render_records(records: list[QuestionRecord], tokenizer, split: str, validation: SplitValidation,
                   options: RenderOptions, report_skip: Callable[[str], None] | None = None) -> list[RenderedQuestion]:
    """What :func:`render_questions` does to some records of a split (the token cache renders a split in chunks,
    ``forklight.data.cache``), without the split's closing count and warnings: counts go to ``validation``, each
    skipped record's message to ``report_skip`` (default: logged as a warning)."""
    report_skip = report_skip or (lambda message: log.warning("skipped bad record: %s", message))
    end_id = end_of_turn_id(tokenizer, options.end_token)
    max_length, overlong = options.max_length, options.overlong
    questions = []
    for start in range(0, len(records), ENCODE_BATCH):
        batch = records[start : start + ENCODE_BATCH]
        encoded = iter(encode_traces(tokenizer, [trace.text for record in batch for trace in record.traces], end_id))
        for record in batch:
            encoded_traces = [next(encoded) for _ in record.traces]  # each: trace + end-of-turn
            try:
                if split == "train" and len(record.traces) < options.min_traces:
                    raise RecordError(
                        f"{record.location}: question has {len(record.traces)} traces, fewer than "
                        f"data.min_traces={options.min_traces}; add traces or lower data.min_traces", "too_few_traces"
                    )
                prompt_ids = render_prompt_ids(tokenizer, record, options.prompt_template, options.system_prompt)
                if len(prompt_ids) + 2 > max_length:
                    raise RecordError(
                        f"{record.location}: prompt is {len(prompt_ids)} tokens, leaving no room for a trace "
                        f"within data.max_length={max_length}; raise data.max_length or shorten the prompt",
                        "prompt_too_long",
                    )
            except RecordError as error:
                if options.on_bad_record == "error":
                    raise
                validation.skipped[error.reason] += 1
                report_skip(str(error))
                continue
            room = max_length - len(prompt_ids) - 1  # tokens left after prompt and tag
            trace_ids, sources = [], []
            for number, (trace, ids) in enumerate(zip(record.traces, encoded_traces), 1):
                if len(ids) > room:
                    count_overlong(record, number, len(prompt_ids), len(ids), max_length, overlong, validation)
                    if overlong == "skip":
                        continue
                    ids = ids[:room]
                trace_ids.append(ids)
                sources.append(trace.source)
            if record.traces and not trace_ids:  # every trace was overlong (data.overlong=skip)
                validation.skipped["overlong"] += 1
                continue
            questions.append(
                RenderedQuestion(
                    id=record.id,
                    prompt_ids=prompt_ids,
                    trace_ids=trace_ids,
                    sources=sources,
                    answer=record.answer,
                    columns=record.columns,
                    location=record.location,
                )
            )
            if split == "train" and options.max_traces is not None and len(trace_ids) > options.max_traces:
                validation.sampled_questions += 1
    return questions


def encode_traces(tokenizer, texts: list[str], end_id: int) -> list[list[int]]:
    """:func:`~forklight.data.rendering.render_trace_ids` of many texts in one tokenizer call: each text's ids
    (no special tokens) followed by the end-of-turn token."""
    if not texts:
        return []
    return [ids + [end_id] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def warn_overlong(split: str, validation: SplitValidation, max_length: int) -> None:
    """The split's warnings about traces longer than ``max_length`` (truncated or skipped), once per split."""
    if validation.truncated_traces:
        log.warning(
            "%s: %d traces longer than data.max_length=%d were truncated (%d tokens cut; their end-of-turn token "
            "is lost); set data.init_args.overlong=skip or error, or raise data.init_args.max_length",
            split, validation.truncated_traces, max_length, validation.truncated_tokens,
        )
    if validation.dropped_traces:
        log.warning("%s: %d traces longer than data.max_length=%d were skipped (%d tokens; data.overlong=skip)",
                    split, validation.dropped_traces, max_length, validation.dropped_tokens)


def count_overlong(record: QuestionRecord, number: int, prompt_tokens: int, trace_tokens: int, max_length: int,
                   overlong: str, validation: SplitValidation) -> None:
    """Count (or, with ``overlong="error"``, refuse) trace ``number`` of ``record``, whose row is longer than
    ``max_length``."""
    room = max_length - prompt_tokens - 1  # tokens left after prompt and tag
    if overlong == "error":
        where = record.traces[number - 1].location or record.location
        raise RecordError(
            f"{where}: trace {number} of question '{record.id}' is {trace_tokens} tokens (with its end of turn); "
            f"after the {prompt_tokens}-token prompt and the tag its row is {prompt_tokens + 1 + trace_tokens} > "
            f"data.init_args.max_length={max_length}; raise data.init_args.max_length, shorten the trace, or set "
            "data.init_args.overlong=truncate or skip",
            "overlong",
        )
    if overlong == "skip":
        validation.dropped_traces += 1
        validation.dropped_tokens += trace_tokens
    else:
        validation.truncated_traces += 1
        validation.truncated_tokens += trace_tokens - room


def check_gold_answers(
    questions: list[RenderedQuestion], parse: Callable[[str], object], split: str, on_bad_record: str
) -> tuple[list[RenderedQuestion], Counter[str]]:
    """The questions whose gold answer ``parse`` reads, and the others counted per reason
    (``missing_answer``, ``unparseable_answer``). Reads only ``id``, ``answer`` and ``location``, so the token
    cache's :class:`~forklight.data.cache.CachedQuestion` s are checked without reading their tokens.

    Unless ``on_bad_record="skip"``, the first question without a readable answer raises
    :class:`RecordError`, naming the question and its file:line.
    """
    kept, bad = [], Counter()
    for question in questions:
        reason = "missing_answer" if question.answer is None else (
            "unparseable_answer" if parse(question.answer) is None else None)
        if reason is None:
            kept.append(question)
            continue
        if on_bad_record != "skip":
            what = ("has no gold answer" if question.answer is None
                    else f"has a gold answer {question.answer!r} that model.verifier cannot parse")
            raise RecordError(f"{question.location or split}: question '{question.id}' ({split} split) {what}; "
                              "fix the answer, choose a model.verifier that reads it, or set "
                              "data.on_bad_record=skip", reason)
        bad[reason] += 1
    return kept, bad


def validation_summary(reports: dict[str, SplitValidation], on_bad_record: str) -> str:
    """What setup's validation kept, skipped (per reason), truncated and sampled, per split."""
    lines = [f"forklight data validation (data.on_bad_record={on_bad_record}):"]
    lines += [f"  {split}: {report.summary()}" for split, report in reports.items()]
    return "\n".join(lines)


def validation_counts(reports: dict[str, SplitValidation]) -> dict[str, int]:
    """``data/{split}/questions`` and ``data/{split}/skipped/{reason}``, for the logger."""
    counts = {f"data/{split}/questions": report.questions for split, report in reports.items()}
    return counts | {f"data/{split}/skipped/{reason}": n for split, report in reports.items()
                     for reason, n in report.skipped.items()}
