"""``forklight prepare`` end to end (:func:`prepare`): read the corpus, (sample,) curate, write the parquet and
the report atomically; and its command line (:func:`prepare_parser`, :func:`prepare_cli`)."""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

from forklight.data.loading import load_records
from forklight.data.records import QuestionRecord
from forklight.errors import ConfigError, UserError
from forklight.prepare.config import PrepareConfig
from forklight.prepare.curate import build_tokenizer, build_verifier, curate_all, source_name
from forklight.prepare.report import PrepareReport, _plain, build_report, report_markdown

OUTPUT_FIELDS = ("id", "prompt", "messages", "answer", "traces")  # the grouped layout's own names


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
        # jsonargparse >= 4.42 names it instantiate; 4.41 (the lowest supported) instantiate_classes
        built = (getattr(parser, "instantiate", None) or parser.instantiate_classes)(values)
    except ConfigError as error:  # data.think's own check names data.think.*: here it is think.*
        raise ConfigError(re.sub(r"\bdata\.(init_args\.)?(?=think|fields|layout|on_bad_record)", "", str(error))) from error
    options = {key: getattr(built, key) for key in PrepareConfig.__dataclass_fields__}
    return prepare(PrepareConfig(**options))
