"""``ForkDataModule``: multi-trace questions, grouped per question, for every forklight module.

Reads records (files, a ``datasets`` name/dir, or the embedded toy task), validates every record
at setup (and the gold answers, with the parser the model hands to :meth:`ForkDataModule.check_gold_answers`),
renders and tokenises them once (into the token cache, ``forklight.data.cache``: built in ``prepare_data`` on
the first run, memory-mapped by every rank after), and serves :class:`TraceSetBatch` batches: whole
questions with their trace sets, so SSFT can match a question's traces to tags and RL modules
can use the prompts and answers. Questions of similar length are batched together (dynamic
padding happens when the module assembles rows).

This file holds the configuration (the constructor), the reading of splits and the loaders; the
checks and counts at setup are in ``forklight.data.validation``, the token cache in ``forklight.data.cache``,
the dataset, sampler and collation in ``forklight.data.batching``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from forklight.data.benchmarks import BENCHMARKS, load_benchmark
from forklight.data.layouts import ThinkMarkup
from forklight.data.batching import LengthGroupedSampler, QuestionDataset, ResumableDataLoader, collate_questions
from forklight.data.cache import CacheEntry, build_entry, open_entry
from forklight.data.cache_key import KEY_OPTIONS, entry_directory, entry_identity, resolve_cache_dir
from forklight.data.loading import load_records
from forklight.data.records import LAYOUTS, ON_BAD_RECORD, FieldNames, QuestionRecord
from forklight.data.rendering import TOY_TOKENIZER, RenderedQuestion, load_tokenizer
from forklight.data.validation import (
    OVERLONG,
    RenderOptions,
    SplitValidation,
    check_gold_answers,
    format_counts,
    render_questions,
    validation_counts,
    validation_summary,
)
from forklight.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class ToyTask:
    """Options of the embedded toy arithmetic task (``forklight.data.toy``)."""

    num_train: int = 20000
    num_val: int = 200
    num_test: int = 500
    min_terms: int = 2
    max_terms: int = 3
    min_digits: int = 2
    max_digits: int = 2
    seed: int = 1234


class ForkDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        toy: ToyTask | None = None,
        benchmark: str | None = None,
        tokenizer: str = TOY_TOKENIZER,
        num_fork_tokens: int | None = 6,
        fields: FieldNames = FieldNames(),
        layout: str = "auto",
        think: ThinkMarkup = ThinkMarkup(),
        on_bad_record: str = "error",
        val_size: int = 0,
        test_size: int = 0,
        prompt_template: str | None = None,
        system_prompt: str | None = None,
        end_token: str | None = None,
        max_length: int = 2048,
        overlong: str = "truncate",
        max_traces: int | None = None,
        min_traces: int = 1,
        batch_size: int = 8,
        max_tokens_per_batch: int | None = None,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        num_proc: int = 1,
        cache: bool = True,
        cache_dir: str | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ) -> None:
        """Multi-trace question data for SSFT, SFT and RL modules.

        Args:
            train: training data: a .jsonl/.json/.parquet file, a local dir or a ``datasets`` name.
            val: validation data (same formats); if unset, ``val_size`` questions are split off ``train``.
            test: test data (same formats); if unset, ``test_size`` questions are split off ``train``.
            predict: questions for ``forklight predict`` (same formats, or questions without traces:
                ``{"id", "prompt" | "messages", "answer"?}`` per line); default the test split.
            toy: the embedded toy arithmetic task; off when ``train`` is set (a ``val``/``test`` file
                replaces that toy split).
            benchmark: read ``test`` (and ``val``, ``predict``) in an evaluation benchmark's own layout
                (``aime24``, ``aime25``, ``math500``, ``gpqa_diamond``, ``livecodebench``;
                :mod:`forklight.data.benchmarks`): a local file or dir in that layout, or its hub dataset when
                ``test`` is unset. Questions without traces; ``train`` may then be unset (evaluation only).
            tokenizer: tokenizer name or path (linked from ``model.tokenizer``); ``toy`` = character tokenizer.
            num_fork_tokens: number of forking tokens (linked from the model).
            fields: field names of the input records.
            layout: ``grouped`` (one question per row; a list column of traces, with optional per-trace keep flags),
                ``flat`` (one trace per row), ``columns`` (one column per trace: ``fields.trace_columns``), ``chat``
                (a conversation per row, its last assistant turn the trace), ``prompts`` (questions without traces;
                ``predict`` files only) or ``auto`` (decided by the first row; :mod:`forklight.data.layouts`).
            think: keep or strip the ``<think>…</think>`` markup of traces, and keep the reasoning, the final
                answer or both (:class:`~forklight.data.layouts.ThinkMarkup`).
            on_bad_record: ``error`` stops at the first bad record; ``skip`` skips and counts it.
            val_size: questions split off ``train`` (seeded) when ``val`` is unset.
            test_size: questions split off ``train`` (seeded) when ``test`` is unset.
            prompt_template: format string with ``{prompt}``, used instead of the chat template.
            system_prompt: system message put first when rendering with the chat template.
            end_token: token that ends an answer (default: the tokenizer's EOS).
            max_length: longest row (prompt + tag + trace + end); see ``overlong`` for longer traces.
            overlong: a trace whose row is longer than ``max_length``: ``truncate`` it (its end-of-turn
                token is lost), ``skip`` it (a question left without traces is skipped), or stop with an
                ``error`` naming its file:line. Traces and tokens cut or skipped are counted per split.
            max_traces: most traces per question per step (default: ``num_fork_tokens``); more are sampled.
            min_traces: questions with fewer training traces are an error (or skipped).
            batch_size: questions per training batch.
            max_tokens_per_batch: form training batches by tokens instead: as many questions as fit in this many
                tokens (prompt + traces) per rank; a question longer than that is split into pieces of its traces,
                each matched as the whole question and training its own traces (SSFT/SFT only); under data
                parallelism each global batch is split over the ranks balancing their tokens. ``batch_size`` then
                only sets the length-grouping window. The loss stays the token mean over the whole optimiser step.
            eval_batch_size: questions per validation/test batch.
            num_workers: DataLoader worker processes.
            num_proc: worker processes that render and tokenise the data when the token cache entry is built
                (1: in this process); each takes chunks of records and batch-encodes them.
            cache: tokenise once: the first run writes the rendered token ids of every split to a cache entry,
                keyed by the data's content, the tokenizer and the options above that change the ids; every
                later run and every rank memory-maps it (``docs/token-cache.md``). The toy task is cached too.
                ``false``: read and tokenise everything at every setup, on every rank.
            cache_dir: the token cache's directory (may be shared by nodes); null: ``$FORKLIGHT_CACHE_DIR`` if set,
                else ``~/.cache/forklight/tokens``.
            seed: seed of the splits, the shuffling and the trace sampling.
            trust_remote_code: allow a tokenizer's own code (off unless the model asks for it).
        """
        super().__init__()
        for key, value, allowed in (("on_bad_record", on_bad_record, ON_BAD_RECORD), ("layout", layout, LAYOUTS),
                                    ("overlong", overlong, OVERLONG)):
            if value not in allowed:
                raise ConfigError(f"data.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if benchmark is not None and benchmark not in BENCHMARKS:
            raise ConfigError(f"data.benchmark must be one of {sorted(BENCHMARKS)} or null, got {benchmark!r}")
        if train is None and toy is None and benchmark is None:
            raise ConfigError("set data.train to a data file/dataset, or data.toy for the embedded toy task")
        if train is not None and toy is not None:  # an explicit file overrides a config's toy default
            rank_zero_info(f"forklight: data.init_args.train={train!r} is set, so the toy task (data.init_args.toy) is off")
            toy = None
        for split, size, file in (("val", val_size, val), ("test", test_size, test)):
            if size and toy is not None:
                raise ConfigError(f"data.init_args.{split}_size={size} splits questions off data.init_args.train, but "
                                  f"the toy task makes its own {split} split: set data.init_args.toy.num_{split} instead")
            if size and file is not None:
                raise ConfigError(f"data.init_args.{split}={file!r} and data.init_args.{split}_size={size} are both set; "
                                  f"give one (--data.init_args.{split}=null splits {split}_size questions off train)")
        for key, value, low in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                ("max_length", max_length, 8), ("min_traces", min_traces, 1),
                                ("max_traces", 1 if max_traces is None else max_traces, 1), ("num_workers", num_workers, 0),
                                ("val_size", val_size, 0), ("test_size", test_size, 0), ("num_proc", num_proc, 1)):
            if value < low:
                raise ConfigError(f"data.{key} must be >= {low}, got {value}")
        if max_tokens_per_batch is not None and max_tokens_per_batch < 1:
            raise ConfigError(f"data.max_tokens_per_batch must be >= 1 or null, got {max_tokens_per_batch}")
        self.save_hyperparameters()
        if toy is None:  # also when data.train turned it off (LightningCLI saves the config as given)
            self.hparams["toy"] = None
        self.toy = toy
        self.fields = fields
        self.think = think
        self.max_traces = max_traces if max_traces is not None else num_fork_tokens
        self.tokenizer = None
        self.datasets: dict[str, QuestionDataset] = {}
        # What validation did, per split: printed at setup, completed by check_gold_answers.
        self.validation: dict[str, SplitValidation] = {}
        self._prepared: CacheEntry | None = None  # the token cache entry prepare_data opened or built, for setup

    def follow_init_from(self, tokenizer: str, num_fork_tokens: int) -> None:
        """The model's tokenizer and N when its ``init_from`` fixed them (a config's ``tokenizer`` or
        ``num_fork_tokens: null`` gives way to the export's); before setup, so the data is tokenised with them."""
        updates = {"tokenizer": tokenizer}
        if self.hparams.get("num_fork_tokens") is None:
            updates["num_fork_tokens"] = num_fork_tokens
            if self.hparams.get("max_traces") is None:
                self.max_traces = num_fork_tokens
        for key, value in updates.items():
            self.hparams[key] = value
            if getattr(self, "_hparams_initial", None) is not None:  # what Lightning logs and merges with the model's
                self._hparams_initial[key] = value

    # ---- reading -------------------------------------------------------------------------
    def _read(self, path: str | None, split: str) -> list[QuestionRecord]:
        benchmark = self.hparams.get("benchmark")
        if benchmark is not None and split != "train":  # the benchmark's layout (path None: its hub dataset)
            records, report = load_benchmark(benchmark, path, self.hparams.seed, self.hparams.on_bad_record)
        else:
            records, report = load_records(
                path, fields=self.fields, layout=self.hparams.layout, on_bad_record=self.hparams.on_bad_record,
                questions_only=split == "predict", think=self.think,
            )
        validation = self.validation.setdefault(split, SplitValidation())
        validation.skipped.update(report.skip_reasons)
        if report.emptied:  # every trace left out by the data's flags or data.think: counted, not a bad record
            validation.skipped["no_kept_traces"] += report.emptied
        for (reason, _), count in report.dropped_traces.items():
            validation.left_out[reason] += count
        for message in report.skipped:
            log.warning("skipped bad record: %s", message)
        return records

    def _read_splits(self) -> dict[str, list[QuestionRecord]]:
        splits = self._read_toy_splits() if self.toy is not None else self._read_file_splits()
        if self.hparams.predict is not None:  # a predict file works with the toy task too
            splits["predict"] = self._read(self.hparams.predict, "predict")
        return splits

    def _read_toy_splits(self) -> dict[str, list[QuestionRecord]]:
        from forklight.data.toy import generate_toy_records

        toy = self.toy
        total = toy.num_train + toy.num_val + toy.num_test
        try:
            records = generate_toy_records(total, toy.seed, toy.min_terms, toy.max_terms, toy.min_digits, toy.max_digits)
        except ValueError as error:  # the toy's own option checks
            raise ConfigError(f"data.toy: {error}") from error
        splits = {
            "train": records[: toy.num_train],
            "val": records[toy.num_train : toy.num_train + toy.num_val],
            "test": records[toy.num_train + toy.num_val :],
        }
        for split in ("val", "test"):  # a file the user names replaces the toy's split
            if self.hparams[split] is not None:
                splits[split] = self._read(self.hparams[split], split)
        return splits

    def _read_file_splits(self) -> dict[str, list[QuestionRecord]]:
        if self.hparams.train is None:  # evaluation of a benchmark only
            return {"train": [], "val": self._read(self.hparams.val, "val") if self.hparams.val else [],
                    "test": self._read(self.hparams.test, "test")}
        splits = {"train": self._read(self.hparams.train, "train")}
        rng = np.random.default_rng(self.hparams.seed)
        for name, size in (("val", self.hparams.val_size), ("test", self.hparams.test_size)):
            given = self.hparams[name]
            if given is not None:
                splits[name] = self._read(given, name)
            elif size > 0:
                if size >= len(splits["train"]):
                    raise ConfigError(f"data.{name}_size={size} leaves no training questions ({len(splits['train'])} read)")
                order = rng.permutation(len(splits["train"]))
                held = set(order[:size].tolist())
                splits[name] = [r for i, r in enumerate(splits["train"]) if i in held]
                splits["train"] = [r for i, r in enumerate(splits["train"]) if i not in held]
            else:
                splits[name] = []
        return splits

    def prepare_data(self) -> None:
        """Lightning's hook, run on each node's local rank 0 before any rank's :meth:`setup` (the others wait):
        builds this configuration's token cache entry if there is none, so every rank then memory-maps it."""
        if self.hparams.get("cache", True) and not self.datasets:
            self._prepared = self._cache_entry()

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer, self.hparams.trust_remote_code)
        if self.hparams.get("cache", True):  # the token cache (forklight.data.cache): built once, memory-mapped
            prepared, self._prepared = self._prepared, None
            entry = prepared or self._cache_entry()
            if not entry.built:
                entry.replay_warnings()  # what the build warned about, as a fresh run would
            elif prepared is None and self.trainer is not None and self.trainer.world_size > 1:
                log.warning("rank %d built the token cache entry itself (%s): prepare_data on its node's local rank "
                            "0 did not; give every node a data.init_args.cache_dir they share, or keep Lightning's "
                            "prepare_data_per_node=True", self.trainer.global_rank, entry.directory)
            self.validation.clear()
            self.validation.update({split: cached.validation for split, cached in entry.splits.items()})
            splits = {split: cached.questions for split, cached in entry.splits.items()}
            rank_zero_info(f"forklight token cache: {'built' if entry.built else 're-used'} {entry.directory} "
                           f"({entry.describe()})")
        else:
            splits = {split: self._render(records, split) for split, records in self._read_splits().items()}
        for split, questions in splits.items():
            max_traces = self.max_traces if split == "train" else None  # evaluation keeps every trace
            self.datasets[split] = QuestionDataset(questions, max_traces, self.hparams.seed)
        if not self.datasets["train"].questions and stage in (None, "fit"):
            raise ConfigError("no training questions left after validation; check the data, data.on_bad_record "
                              "and data.overlong")
        rank_zero_info(self.validation_summary())

    # ---- the token cache (forklight.data.cache) -----------------------------------------
    def _cache_entry(self) -> CacheEntry:
        """This configuration's token cache entry: opened, or built (read, rendered, written) if there is none."""
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer, self.hparams.trust_remote_code)
        cache_dir, origin = resolve_cache_dir(self.hparams.get("cache_dir"))
        options = {name: self.hparams.get(name) for name in KEY_OPTIONS}
        options |= {"toy": self.toy, "fields": self.fields, "think": self.think, "max_traces": self.max_traces}
        identity = entry_identity(options, self.tokenizer, cache_dir)
        directory = entry_directory(cache_dir, identity)
        entry = open_entry(directory)
        if entry is None:
            self.validation.clear()  # the build's reading and rendering count into it afresh
            entry = build_entry(directory, self._read_splits, self.validation, self.tokenizer, self._render_options(),
                                self.hparams.get("num_proc", 1), identity, origin)
        return entry

    # ---- validation (forklight.data.validation) -----------------------------------------
    def _render_options(self) -> RenderOptions:
        hp = self.hparams
        return RenderOptions(prompt_template=hp.prompt_template, system_prompt=hp.system_prompt,
                             end_token=hp.end_token, max_length=hp.max_length, overlong=hp.overlong,
                             min_traces=hp.min_traces, max_traces=self.max_traces, on_bad_record=hp.on_bad_record)

    def _render(self, records: list[QuestionRecord], split: str) -> list[RenderedQuestion]:
        validation = self.validation.setdefault(split, SplitValidation())
        return render_questions(records, self.tokenizer, split, validation, self._render_options())

    def validation_summary(self) -> str:
        """What setup's validation kept, skipped (per reason), truncated and sampled, per split."""
        return validation_summary(self.validation, self.hparams.on_bad_record)

    def validation_counts(self) -> dict[str, int]:
        """``data/{split}/questions`` and ``data/{split}/skipped/{reason}``, for the logger."""
        return validation_counts(self.validation)

    def check_gold_answers(self, parse: Callable[[str], object] | None, splits: Sequence[str]) -> None:
        """Every gold answer of ``splits`` (those the model's verifier scores) must be readable by
        ``parse``, the verifier's gold-answer parser (None: a user verifier that cannot tell; not checked).

        The model hands it over at its setup (:meth:`forklight.modules.base.ForkModule.setup`). Missing
        or unparseable answers raise, naming the question and its file:line, or under
        ``data.on_bad_record: skip`` are dropped and counted (``missing_answer``, ``unparseable_answer``).
        """
        if parse is None:
            return
        for split in splits:
            dataset = self.datasets.get(split)
            if dataset is None:
                continue
            kept, bad = check_gold_answers(dataset.questions, parse, split, self.hparams.on_bad_record)
            if bad:
                dataset.questions[:] = kept
                if split in self.validation:
                    self.validation[split].skipped.update(bad)
                    self.validation[split].questions = len(kept)
                rank_zero_info(f"forklight data validation: {split}: skipped {format_counts(bad)}")

    # ---- loaders -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        max_tokens = self.hparams.get("max_tokens_per_batch")
        return ResumableDataLoader(
            dataset,
            batch_size=self.hparams.batch_size if max_tokens is None else None,  # None: the sampler yields batches
            # Under DDP/FSDP each rank takes its own questions ({num_replicas, rank} from the strategy).
            sampler=LengthGroupedSampler(dataset, self.hparams.batch_size, self.hparams.seed, max_tokens=max_tokens,
                                         **((self.trainer.distributed_sampler_kwargs if self.trainer else None) or {})),
            collate_fn=collate_questions,
            num_workers=self.hparams.num_workers,
            drop_last=max_tokens is None,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=self.hparams.eval_batch_size,
            shuffle=False,
            collate_fn=collate_questions,
            num_workers=self.hparams.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("predict" if "predict" in self.datasets else "test")
