"""Sampling trace sets (:func:`sample_traces`): teacher after teacher, each question's K samples from its own seed
(:func:`question_seed`), only the questions its store does not hold yet; the complete samples become the questions'
traces, and :class:`SampleReport` says what was read back, generated and left out."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forklight.data.records import QuestionRecord, Trace
from forklight.data.rendering import load_tokenizer, render_prompt_ids
from forklight.errors import ConfigError, UserError
from forklight.models import model_source
from forklight.rollout import SamplingSettings
from forklight.teachers.config import KEY, Teacher, TeacherSampling, teacher_name, teacher_weights_path
from forklight.teachers.engines import HFSampler, VLLMSampler, resolve_engine, stop_token_ids
from forklight.teachers.store import (StoredQuestion, StoredSample, TeacherStore, question_hash, store_file_name,
                                      weights_fingerprint)


def question_seed(seed: int, teacher: str, question_id: str) -> int:
    """The seed of one question's samples from one teacher: the same every run, independent across questions."""
    digest = hashlib.sha256(f"{seed}\0{teacher}\0{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class TeacherReport:
    """What sampling did for one teacher. Counts of samples cover every question (read back or generated)."""

    name: str
    path: str
    engine: str  # the engine that sampled (or would have: nothing was left to generate)
    store: str  # its store file
    questions: int = 0
    reused: int = 0  # questions read back from the store
    generated: int = 0  # questions sampled in this run
    samples_written: int = 0  # samples appended to the store in this run (generated * K)
    traces: int = 0  # complete samples returned as traces
    truncated: int = 0  # samples that hit max_new_tokens (left out: incomplete)
    empty: int = 0  # samples with no text (left out)
    seconds: float = 0.0  # time spent loading and sampling


@dataclass
class SampleReport:
    """What :func:`sample_traces` did, per teacher."""

    store_dir: str
    teachers: list[TeacherReport] = field(default_factory=list)

    @property
    def dropped(self) -> Counter[tuple[str, str]]:
        """(reason, source) -> samples left out, as ``LoadReport.dropped_traces`` counts them: ``incomplete``
        (hit max_new_tokens) and ``empty``."""
        counts: Counter[tuple[str, str]] = Counter()
        for teacher in self.teachers:
            counts["incomplete", teacher.name] += teacher.truncated
            counts["empty", teacher.name] += teacher.empty
        return +counts  # zero counts removed

    def summary(self) -> str:
        """One line per teacher, for the log."""
        return "\n".join(
            f"teacher {t.name} ({t.engine}): {t.questions} questions ({t.reused} from {t.store}, {t.generated} "
            f"generated: {t.samples_written} samples written), {t.traces} traces, {t.truncated} truncated "
            f"(dropped as incomplete), {t.empty} empty" for t in self.teachers)


@dataclass
class TeacherJob:
    """A teacher ready to sample: its tokenizer loaded, stop ids found, store opened (all before any model loads)."""

    teacher: Teacher
    name: str
    tokenizer: Any
    stop_ids: list[int]
    store: TeacherStore


def open_teacher(index: int, teacher: Teacher, records: Sequence[QuestionRecord], sampling: TeacherSampling,
                 engine: str, store_dir: str) -> TeacherJob:
    """Load the teacher's tokenizer, render one prompt (so a template problem shows now) and open its store."""
    key, name = f"{KEY}.teachers[{index}]", teacher_name(teacher)
    source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
    try:
        tokenizer = load_tokenizer(teacher.tokenizer or teacher_weights_path(teacher), teacher.trust_remote_code)
        if teacher.prompt_template is None and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"the tokenizer has no chat template; set {key}.prompt_template "
                              "(e.g. 'Question: {prompt}\\nAnswer: ')")
        stop_ids = stop_token_ids(tokenizer, None if gguf else source, teacher.end_token)
        render_prompt_ids(tokenizer, records[0], teacher.prompt_template, teacher.system_prompt)
    except ConfigError as error:
        raise ConfigError(f"{key} ({teacher_weights_path(teacher)}): {error}") from error
    template = getattr(tokenizer, "chat_template", None) if teacher.prompt_template is None else None
    protocol = {
        "teacher": name, "fingerprint": weights_fingerprint(teacher_weights_path(teacher)), "engine": engine,
        "dtype": teacher.dtype, "num_samples": sampling.num_samples, "temperature": sampling.temperature,
        "top_p": sampling.top_p, "max_new_tokens": sampling.max_new_tokens, "seed": sampling.seed,
        "prompt_template": teacher.prompt_template, "system_prompt": teacher.system_prompt,
        "chat_template_sha256": hashlib.sha256(json.dumps(template).encode()).hexdigest() if template else None,
        "stop_ids": stop_ids,
    }
    recorded = {"path": os.path.abspath(teacher_weights_path(teacher)), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    store = TeacherStore(Path(store_dir) / store_file_name(name), protocol, recorded)
    return TeacherJob(teacher, name, tokenizer, stop_ids, store)


def sample_teacher(job: TeacherJob, records: Sequence[QuestionRecord], sampling: TeacherSampling, engine: str,
                   store_dir: str, report: TeacherReport, say, progress: bool) -> None:
    """Sample the questions the teacher's store does not hold yet (loading the teacher only if there are any)."""
    hashes = {record.id: question_hash(record) for record in records}
    stored = job.store.finished
    todo = [r for r in records if r.id not in stored or stored[r.id].question_sha256 != hashes[r.id]]
    report.reused, report.generated = len(records) - len(todo), len(todo)
    say(f"teacher {job.name} ({engine}): {report.reused} of {len(records)} questions in {job.store.path}, "
        f"sampling {len(todo)} x {sampling.num_samples}")
    if not todo:
        return
    settings = SamplingSettings(sampling.temperature, sampling.top_p, sampling.max_new_tokens, job.stop_ids,
                                batch_size=sampling.batch_size)
    with loading_bars(progress):
        if engine == "vllm":
            sampler: HFSampler | VLLMSampler = VLLMSampler(job.teacher, job.tokenizer, sampling.vllm,
                                                           sampling.questions_per_chunk, store_dir)
        else:
            device = sampling.device or ("cuda" if torch.cuda.is_available() else "cpu")
            sampler = HFSampler(job.teacher, job.tokenizer, device)
    bar = progress_bar(len(todo), f"{job.name} ({engine})", progress, sampling.questions_per_chunk, say)
    try:
        for start in range(0, len(todo), sampler.questions_per_call):
            chunk = todo[start : start + sampler.questions_per_call]
            prompts = [render_prompt_ids(job.tokenizer, r, job.teacher.prompt_template, job.teacher.system_prompt)
                       for r in chunk]
            seeds = [question_seed(sampling.seed, job.name, r.id) for r in chunk]
            completions = sampler.sample(prompts, seeds, settings, sampling.num_samples)  # [chunk][K]
            job.store.append([
                StoredQuestion(r.id, hashes[r.id], [StoredSample(c.text, c.length, c.truncated) for c in samples])
                for r, samples in zip(chunk, completions, strict=True)])
            report.samples_written += len(chunk) * sampling.num_samples
            bar(len(chunk))
    finally:
        sampler.close()


@contextlib.contextmanager
def loading_bars(enabled: bool):
    """transformers' "Loading weights" bars shown only when progress is."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    if not enabled:
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not enabled and was_enabled:
            transformers_logging.enable_progress_bar()


def progress_bar(total: int, name: str, enabled: bool, every: int, say):
    """``advance(n)``: a tqdm bar on a terminal, else a line on stderr every ``every`` questions and at the end."""
    if not enabled:
        return lambda n: None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"sample {name}", unit="question", file=sys.stderr, dynamic_ncols=True)

        def advance(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return advance
    done = [0]

    def advance_lines(n: int) -> None:
        before, done[0] = done[0], done[0] + n
        if done[0] // every > before // every or done[0] >= total:
            say(f"sample {name}: {done[0]}/{total} questions")

    return advance_lines


def sample_traces(records: list[QuestionRecord], sampling: TeacherSampling, store_dir: str,
                  progress: bool = True) -> tuple[list[QuestionRecord], SampleReport]:
    """The records (copies, in order) with each teacher's complete samples appended as ``Trace(text, source=<teacher
    name>)``, teacher by teacher, and what was done. Samples are stored in ``store_dir`` as they are made, and a
    re-run with the same protocol samples only the questions not stored yet (module docstring)."""
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if progress else (lambda line: None)
    sampling.check()
    seen: dict[str, str] = {}
    for record in records:
        if record.id in seen:
            raise UserError(f"question id {record.id!r} appears twice ({seen[record.id]} and {record.location}): "
                            "sampled questions need unique ids")
        seen[record.id] = record.location
    report = SampleReport(store_dir)
    if not records:
        return [], report
    engine = resolve_engine(sampling.engine, say)
    jobs = [open_teacher(i, t, records, sampling, engine, store_dir) for i, t in enumerate(sampling.teachers)]
    for job in jobs:
        started = time.monotonic()
        teacher_report = TeacherReport(job.name, teacher_weights_path(job.teacher), engine, str(job.store.path),
                                       questions=len(records))
        sample_teacher(job, records, sampling, engine, store_dir, teacher_report, say, progress)
        teacher_report.seconds = time.monotonic() - started
        report.teachers.append(teacher_report)
    added: dict[str, list[Trace]] = {record.id: [] for record in records}
    for job, teacher_report in zip(jobs, report.teachers):
        for record in records:
            stored = job.store.finished[record.id]
            for sample in stored.samples:
                if sample.truncated:
                    teacher_report.truncated += 1
                elif not sample.text.strip():
                    teacher_report.empty += 1
                else:
                    added[record.id].append(Trace(sample.text, job.name, f"{job.store.path}:{stored.line}"))
                    teacher_report.traces += 1
    say(report.summary())
    return [dataclasses.replace(record, traces=[*record.traces, *added[record.id]]) for record in records], report
