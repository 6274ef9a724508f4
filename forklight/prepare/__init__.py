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

Files: ``config.py`` (:class:`PrepareConfig`), ``curate.py`` (verify, deduplicate and select one question's traces; the
worker pool over all of them), ``report.py`` (:class:`PrepareReport`, ``report.md``), ``run.py`` (:func:`prepare`:
read, sample, curate, write atomically; the command line).
"""

from forklight.prepare.config import PrepareConfig
from forklight.prepare.curate import (
    CHUNK_QUESTIONS,
    SHINGLE_WORDS,
    CuratedQuestion,
    build_tokenizer,
    build_verifier,
    curate_all,
    curate_chunk,
    curate_question,
    drop_duplicates,
    jaccard,
    normalise_whitespace,
    select_traces,
    shingles,
    source_name,
    verify_traces,
)
from forklight.prepare.report import (
    TRACE_REASONS,
    LengthStats,
    PrepareReport,
    SourceReport,
    build_report,
    length_stats,
    report_markdown,
)
from forklight.prepare.run import OUTPUT_FIELDS, prepare, prepare_cli, prepare_parser, prepared_table

__all__ = [
    "CHUNK_QUESTIONS", "OUTPUT_FIELDS", "SHINGLE_WORDS", "TRACE_REASONS", "CuratedQuestion", "LengthStats",
    "PrepareConfig", "PrepareReport", "SourceReport", "build_report", "build_tokenizer", "build_verifier",
    "curate_all", "curate_chunk", "curate_question", "drop_duplicates", "jaccard", "length_stats",
    "normalise_whitespace", "prepare", "prepare_cli", "prepare_parser", "prepared_table", "report_markdown",
    "select_traces", "shingles", "source_name", "verify_traces",
]
