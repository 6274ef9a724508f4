"""``forklight prepare``'s options: :class:`PrepareConfig`, whose fields are its command line (``docs/prepare.md``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from forklight.data.layouts import ThinkMarkup
from forklight.data.records import LAYOUTS, ON_BAD_RECORD, FieldNames
from forklight.errors import ConfigError

from forklight.teachers import TeacherSampling


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
