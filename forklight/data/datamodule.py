"""``ForkDataModule``: multi-trace questions, grouped per question, for every forklight module.

Reads records (files, a ``datasets`` name/dir, or the embedded toy task), validates every record
at setup (and the gold answers, with the parser the model hands to :meth:`ForkDataModule.check_gold_answers`),
renders and tokenises them once, and serves :class:`TraceSetBatch` batches: whole
questions with their trace sets, so SSFT can match a question's traces to tags and RL modules
can use the prompts and answers. Questions of similar length are batched together (dynamic
padding happens when the module assembles rows).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from forklight.data.records import LAYOUTS, ON_BAD_RECORD, FieldNames, QuestionRecord, RecordError, load_records
from forklight.data.rendering import (
    TOY_TOKENIZER,
    TraceSetBatch,
    end_of_turn_id,
    load_tokenizer,
    render_prompt_ids,
    render_trace_ids,
)
from forklight.errors import ConfigError

log = logging.getLogger(__name__)

OVERLONG = ("truncate", "skip", "error")  # data.overlong: what to do with a trace whose row exceeds data.max_length


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


@dataclass
class RenderedQuestion:
    """A question tokenised once at setup."""

    id: str
    prompt_ids: list[int]
    trace_ids: list[list[int]]  # each: trace + end-of-turn
    sources: list[str | None]
    answer: str | None
    columns: dict
    location: str = ""  # where the question came from, e.g. "train.jsonl:12"


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

    def summary(self) -> str:
        """e.g. ``"64 questions; skipped: 2 malformed_json; 3 traces truncated to data.max_length (812 tokens cut)"``."""
        parts = [f"{self.questions} questions"]
        if self.skipped:
            parts.append("skipped: " + ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())))
        if self.truncated_traces:
            parts.append(f"{self.truncated_traces} traces truncated to data.max_length ({self.truncated_tokens} tokens cut)")
        if self.dropped_traces:
            parts.append(f"{self.dropped_traces} overlong traces skipped ({self.dropped_tokens} tokens)")
        if self.sampled_questions:
            parts.append(f"{self.sampled_questions} questions with more traces than data.max_traces (sampled per epoch)")
        return "; ".join(parts)


class QuestionDataset(Dataset):
    """Rendered questions; ``max_traces`` of a question's traces are drawn per epoch when it has more."""

    def __init__(self, questions: list[RenderedQuestion], max_traces: int | None, seed: int) -> None:
        self.questions = questions
        self.max_traces = max_traces
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int) -> RenderedQuestion:
        question = self.questions[index]
        if self.max_traces is None or len(question.trace_ids) <= self.max_traces:
            return question
        rng = np.random.default_rng((self.seed, self.epoch, index))
        keep = sorted(rng.choice(len(question.trace_ids), size=self.max_traces, replace=False).tolist())
        return RenderedQuestion(
            id=question.id,
            prompt_ids=question.prompt_ids,
            trace_ids=[question.trace_ids[j] for j in keep],
            sources=[question.sources[j] for j in keep],
            answer=question.answer,
            columns=question.columns,
            location=question.location,
        )


class LengthGroupedSampler(DistributedSampler):
    """Shuffled order in which each window of ``batch_size * num_replicas * window_batches`` is sorted by length.

    Batches then hold questions of similar length (little padding) while the order stays
    random across windows. ``set_epoch`` (called by Lightning) reshuffles and redraws traces.

    Data parallel (``num_replicas`` ranks): every rank computes the same order and cuts it into
    global batches of ``batch_size * num_replicas`` questions; rank r takes the r-th ``batch_size``
    of each (a trailing partial global batch is dropped). The ranks see different questions, a
    question's traces stay together, and R ranks with batch b see exactly the batches one process
    with batch R*b sees. It is a ``DistributedSampler`` so that Lightning uses it as it is: it wraps
    any other sampler in one that reshuffles its output, undoing the length grouping.
    """

    def __init__(self, dataset: QuestionDataset, batch_size: int, seed: int, window_batches: int = 32,
                 num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.dataset = dataset
        self.lengths = [len(q.prompt_ids) + sum(len(t) for t in q.trace_ids) for q in dataset.questions]
        self.batch_size = batch_size
        self.window = batch_size * num_replicas * window_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        if self.num_replicas == 1:
            return len(self.lengths)
        return len(self.lengths) // (self.batch_size * self.num_replicas) * self.batch_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        grouped = [index for start in range(0, len(order), self.window)
                   for index in sorted(order[start : start + self.window], key=lambda index: -self.lengths[index])]
        if self.num_replicas == 1:
            yield from grouped
            return
        global_batch = self.batch_size * self.num_replicas
        for start in range(0, len(grouped) - global_batch + 1, global_batch):
            mine = start + self.rank * self.batch_size
            yield from grouped[mine : mine + self.batch_size]


class ResumableDataLoader(DataLoader):
    """A DataLoader that resumes mid-epoch at exactly the next batch.

    Lightning saves ``state_dict()`` (the epoch and the batches served in it) with the fit loop
    in every checkpoint and, on ``--ckpt_path``, calls ``load_state_dict`` before iterating; the
    first iteration of that epoch then skips the batches the interrupted run already trained on
    (they are drawn and dropped, so any sampler, distributed ones included, stays in step).
    Lightning's data fetcher does not prefetch from a loader with a length, so batches served =
    batches trained on when a checkpoint is written.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._epoch: int | None = None  # sampler epoch of the current iteration
        self._served = 0  # batches yielded in the current iteration
        self._resume: dict | None = None  # state to resume from, consumed by the next matching epoch

    def _sampler_epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batches_served": self._served}

    def load_state_dict(self, state: dict) -> None:
        self._resume = dict(state)

    def __iter__(self):
        return self._batches()  # a generator: nothing is drawn before Lightning sets the epoch

    def _batches(self):
        iterator = super().__iter__()
        self._epoch, self._served = self._sampler_epoch(), 0
        resume, self._resume = self._resume, None
        skip = 0
        if resume is not None and resume.get("epoch") == self._epoch and resume.get("batches_served", 0) < len(self):
            skip = resume["batches_served"]
        for _ in range(skip):
            next(iterator)
            self._served += 1
        for batch in iterator:
            self._served += 1
            yield batch


def collate_questions(questions: list[RenderedQuestion]) -> TraceSetBatch:
    return TraceSetBatch(
        ids=[q.id for q in questions],
        prompt_ids=[torch.tensor(q.prompt_ids, dtype=torch.long) for q in questions],
        trace_ids=[[torch.tensor(t, dtype=torch.long) for t in q.trace_ids] for q in questions],
        sources=[q.sources for q in questions],
        answers=[q.answer for q in questions],
        columns=[q.columns for q in questions],
    )


class ForkDataModule(L.LightningDataModule):
    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        toy: ToyTask | None = None,
        tokenizer: str = TOY_TOKENIZER,
        num_fork_tokens: int = 6,
        fields: FieldNames = FieldNames(),
        layout: str = "auto",
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
        eval_batch_size: int = 64,
        num_workers: int = 0,
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
            tokenizer: tokenizer name or path (linked from ``model.tokenizer``); ``toy`` = character tokenizer.
            num_fork_tokens: number of forking tokens (linked from the model).
            fields: field names of the input records.
            layout: ``grouped`` (one question per row), ``flat`` (one trace per row), ``prompts`` (questions
                without traces; ``predict`` files only) or ``auto`` (a ``predict`` file may have no traces).
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
            eval_batch_size: questions per validation/test batch.
            num_workers: DataLoader worker processes.
            seed: seed of the splits, the shuffling and the trace sampling.
            trust_remote_code: allow a tokenizer's own code (off unless the model asks for it).
        """
        super().__init__()
        for key, value, allowed in (("on_bad_record", on_bad_record, ON_BAD_RECORD), ("layout", layout, LAYOUTS),
                                    ("overlong", overlong, OVERLONG)):
            if value not in allowed:
                raise ConfigError(f"data.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        if train is None and toy is None:
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
                                ("val_size", val_size, 0), ("test_size", test_size, 0)):
            if value < low:
                raise ConfigError(f"data.{key} must be >= {low}, got {value}")
        self.save_hyperparameters()
        if toy is None:  # also when data.train turned it off (LightningCLI saves the config as given)
            self.hparams["toy"] = None
        self.toy = toy
        self.fields = fields
        self.max_traces = max_traces if max_traces is not None else num_fork_tokens
        self.tokenizer = None
        self.datasets: dict[str, QuestionDataset] = {}
        # What validation did, per split: printed at setup, completed by check_gold_answers.
        self.validation: dict[str, SplitValidation] = {}

    # ---- reading -------------------------------------------------------------------------
    def _read(self, path: str, split: str) -> list[QuestionRecord]:
        records, report = load_records(
            path, fields=self.fields, layout=self.hparams.layout, on_bad_record=self.hparams.on_bad_record,
            questions_only=split == "predict",
        )
        self.validation.setdefault(split, SplitValidation()).skipped.update(report.skip_reasons)
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

    # ---- rendering -----------------------------------------------------------------------
    def _render(self, records: list[QuestionRecord], split: str) -> list[RenderedQuestion]:
        hp = self.hparams
        end_id = end_of_turn_id(self.tokenizer, hp.end_token)
        questions = []
        validation = self.validation.setdefault(split, SplitValidation())
        for record in records:
            try:
                if split == "train" and len(record.traces) < hp.min_traces:
                    raise RecordError(
                        f"{record.location}: question has {len(record.traces)} traces, fewer than "
                        f"data.min_traces={hp.min_traces}; add traces or lower data.min_traces", "too_few_traces"
                    )
                prompt_ids = render_prompt_ids(self.tokenizer, record, hp.prompt_template, hp.system_prompt)
                if len(prompt_ids) + 2 > hp.max_length:
                    raise RecordError(
                        f"{record.location}: prompt is {len(prompt_ids)} tokens, leaving no room for a trace "
                        f"within data.max_length={hp.max_length}; raise data.max_length or shorten the prompt",
                        "prompt_too_long",
                    )
            except RecordError as error:
                if hp.on_bad_record == "error":
                    raise
                validation.skipped[error.reason] += 1
                log.warning("skipped bad record: %s", error)
                continue
            room = hp.max_length - len(prompt_ids) - 1  # tokens left after prompt and tag
            trace_ids, sources = [], []
            for number, trace in enumerate(record.traces, 1):
                ids = render_trace_ids(self.tokenizer, trace.text, end_id)
                if len(ids) > room:
                    self._overlong(record, number, len(prompt_ids), len(ids), validation)
                    if hp.overlong == "skip":
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
            if split == "train" and self.max_traces is not None and len(trace_ids) > self.max_traces:
                validation.sampled_questions += 1
        if validation.truncated_traces:
            log.warning(
                "%s: %d traces longer than data.max_length=%d were truncated (%d tokens cut; their end-of-turn token "
                "is lost); set data.init_args.overlong=skip or error, or raise data.init_args.max_length",
                split, validation.truncated_traces, hp.max_length, validation.truncated_tokens,
            )
        if validation.dropped_traces:
            log.warning("%s: %d traces longer than data.max_length=%d were skipped (%d tokens; data.overlong=skip)",
                        split, validation.dropped_traces, hp.max_length, validation.dropped_tokens)
        validation.questions = len(questions)
        return questions

    def _overlong(self, record: QuestionRecord, number: int, prompt_tokens: int, trace_tokens: int,
                  validation: SplitValidation) -> None:
        """Count (or, with ``data.overlong=error``, refuse) a trace whose row is longer than ``data.max_length``."""
        hp = self.hparams
        room = hp.max_length - prompt_tokens - 1  # tokens left after prompt and tag
        if hp.overlong == "error":
            where = record.traces[number - 1].location or record.location
            raise RecordError(
                f"{where}: trace {number} of question '{record.id}' is {trace_tokens} tokens (with its end of turn); "
                f"after the {prompt_tokens}-token prompt and the tag its row is {prompt_tokens + 1 + trace_tokens} > "
                f"data.init_args.max_length={hp.max_length}; raise data.init_args.max_length, shorten the trace, or set "
                "data.init_args.overlong=truncate or skip",
                "overlong",
            )
        if hp.overlong == "skip":
            validation.dropped_traces += 1
            validation.dropped_tokens += trace_tokens
        else:
            validation.truncated_traces += 1
            validation.truncated_tokens += trace_tokens - room

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.hparams.tokenizer, self.hparams.trust_remote_code)
        for split, records in self._read_splits().items():
            max_traces = self.max_traces if split == "train" else None  # evaluation keeps every trace
            self.datasets[split] = QuestionDataset(self._render(records, split), max_traces, self.hparams.seed)
        if not self.datasets["train"].questions and stage in (None, "fit"):
            raise ConfigError("no training questions left after validation; check the data, data.on_bad_record "
                              "and data.overlong")
        rank_zero_info(self.validation_summary())

    def validation_summary(self) -> str:
        """What setup's validation kept, skipped (per reason), truncated and sampled, per split."""
        lines = [f"forklight data validation (data.on_bad_record={self.hparams.on_bad_record}):"]
        lines += [f"  {split}: {report.summary()}" for split, report in self.validation.items()]
        return "\n".join(lines)

    def validation_counts(self) -> dict[str, int]:
        """``data/{split}/questions`` and ``data/{split}/skipped/{reason}``, for the logger."""
        counts = {f"data/{split}/questions": report.questions for split, report in self.validation.items()}
        return counts | {f"data/{split}/skipped/{reason}": n for split, report in self.validation.items()
                         for reason, n in report.skipped.items()}

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
            kept, bad = [], Counter()
            for question in dataset.questions:
                reason = "missing_answer" if question.answer is None else (
                    "unparseable_answer" if parse(question.answer) is None else None)
                if reason is None:
                    kept.append(question)
                    continue
                if self.hparams.on_bad_record != "skip":
                    what = ("has no gold answer" if question.answer is None
                            else f"has a gold answer {question.answer!r} that model.verifier cannot parse")
                    raise RecordError(f"{question.location or split}: question '{question.id}' ({split} split) {what}; "
                                      "fix the answer, choose a model.verifier that reads it, or set "
                                      "data.on_bad_record=skip", reason)
                bad[reason] += 1
            if bad:
                dataset.questions[:] = kept
                if split in self.validation:
                    self.validation[split].skipped.update(bad)
                    self.validation[split].questions = len(kept)
                rank_zero_info(f"forklight data validation: {split}: skipped "
                               + ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items())))

    # ---- loaders -------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        dataset = self.datasets["train"]
        return ResumableDataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            # Under DDP/FSDP each rank takes its own questions ({num_replicas, rank} from the strategy).
            sampler=LengthGroupedSampler(dataset, self.hparams.batch_size, self.hparams.seed,
                                         **((self.trainer.distributed_sampler_kwargs if self.trainer else None) or {})),
            collate_fn=collate_questions,
            num_workers=self.hparams.num_workers,
            drop_last=True,
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
