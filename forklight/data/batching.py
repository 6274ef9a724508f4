"""Serving rendered questions in batches: the dataset, the length-grouped sampler, the resumable loader.

:class:`QuestionDataset` holds the questions rendered at setup (in memory, or in the token cache:
``forklight.data.cache``) and draws ``max_traces`` of a question's traces per epoch;
:class:`LengthGroupedSampler` orders them so that a batch holds questions of similar length (each rank
its own share under data parallelism), from their lengths alone; :class:`ResumableDataLoader` resumes
mid-epoch from a checkpoint; :func:`collate_questions` makes the :class:`TraceSetBatch` every module
trains on.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from forklight.data.cache import CachedQuestion
from forklight.data.rendering import RenderedQuestion, TraceSetBatch, first_fit_decreasing

Question = RenderedQuestion | CachedQuestion  # token ids in lists, or in the token cache's memory-mapped arrays


def token_lengths(question: Question) -> tuple[int, list[int]]:
    """Tokens of a question's prompt and of each of its traces (a cached question's from the offsets: none read)."""
    if isinstance(question, CachedQuestion):
        return question.prompt_length, question.trace_lengths
    return len(question.prompt_ids), [len(trace) for trace in question.trace_ids]


class QuestionDataset(Dataset):
    """Rendered questions; ``max_traces`` of a question's traces are drawn per epoch when it has more.

    Items are :class:`RenderedQuestion` s: a cached question (:class:`~forklight.data.cache.CachedQuestion`) has
    its token ids read into lists only when it is served, so a split is never held as lists whole.
    """

    def __init__(self, questions: list[Question], max_traces: int | None, seed: int) -> None:
        self.questions = questions
        self.max_traces = max_traces
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.questions)

    def __getitem__(self, index: int | tuple[int, tuple[int, ...]] | list) -> RenderedQuestion | list[RenderedQuestion]:
        if isinstance(index, list):  # a whole batch (LengthGroupedSampler with max_tokens yields index lists)
            return [self[i] for i in index]
        if isinstance(index, tuple):  # (question, traces): a piece of a question split by the token budget
            question, piece = index
            return dataclasses.replace(self[question], trained=list(piece))
        question = self.questions[index]
        keep = self.drawn_traces(index)
        if isinstance(question, CachedQuestion):
            return question.rendered(keep)
        if keep is None:
            return question
        return RenderedQuestion(
            id=question.id,
            prompt_ids=question.prompt_ids,
            trace_ids=[question.trace_ids[j] for j in keep],
            sources=[question.sources[j] for j in keep],
            answer=question.answer,
            columns=question.columns,
            location=question.location,
        )

    def drawn_traces(self, index: int) -> list[int] | None:
        """The traces of question ``index`` drawn this epoch, in order; None: all (it has at most ``max_traces``)."""
        question = self.questions[index]
        count = len(question.sources) if isinstance(question, CachedQuestion) else len(question.trace_ids)
        if self.max_traces is None or count <= self.max_traces:
            return None
        rng = np.random.default_rng((self.seed, self.epoch, index))
        return sorted(rng.choice(count, size=self.max_traces, replace=False).tolist())

    def drawn_lengths(self, index: int) -> tuple[int, list[int]]:
        """Tokens of question ``index``'s prompt and of each trace drawn this epoch (what ``self[index]`` holds)."""
        prompt, traces = token_lengths(self.questions[index])
        keep = self.drawn_traces(index)
        return prompt, traces if keep is None else [traces[j] for j in keep]


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

    With ``max_tokens`` (``data.max_tokens_per_batch``) it yields whole batches, lists of indices, formed by
    tokens instead (:func:`token_budget_batches`): the loader then takes ``batch_size=None``.
    """

    def __init__(self, dataset: QuestionDataset, batch_size: int, seed: int, window_batches: int = 32,
                 num_replicas: int = 1, rank: int = 0, max_tokens: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.dataset = dataset
        self.lengths = [prompt + sum(traces) for prompt, traces in map(token_lengths, dataset.questions)]
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.window = batch_size * num_replicas * window_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.dataset.epoch = epoch

    def __len__(self) -> int:
        if self.max_tokens is not None:
            return len(self.token_batches())
        if self.num_replicas == 1:
            return len(self.lengths)
        return len(self.lengths) // (self.batch_size * self.num_replicas) * self.batch_size

    def grouped_order(self) -> list[int]:
        """This epoch's question order, sorted by length within each window (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        return [index for start in range(0, len(order), self.window)
                for index in sorted(order[start : start + self.window], key=lambda index: -self.lengths[index])]

    def token_batches(self) -> list[list[int | tuple[int, tuple[int, ...]]]]:
        """This rank's batches of the epoch under ``max_tokens``: its share of each global batch. A question longer
        than ``max_tokens`` is split into pieces of its traces (:func:`trace_pieces`), items ``(index, traces)``:
        each piece's batch matches the whole question and trains the piece's traces."""
        items: list[int | tuple[int, tuple[int, ...]]] = []
        lengths: dict = {}
        for index in self.grouped_order():
            prompt, traces = self.dataset.drawn_lengths(index)  # this epoch's traces (max_traces drawn)
            if prompt + sum(traces) <= self.max_tokens or len(traces) == 1:
                items.append(index)
                lengths[index] = prompt + sum(traces)
                continue
            for piece in trace_pieces(prompt, traces, self.max_tokens):
                item = (index, tuple(piece))
                items.append(item)
                lengths[item] = prompt + sum(traces[j] for j in piece)
        batches = token_budget_batches(items, lengths, self.max_tokens, self.num_replicas)
        return [merge_pieces(shares[self.rank]) for shares in batches]

    def __iter__(self):
        if self.max_tokens is not None:
            yield from self.token_batches()
            return
        grouped = self.grouped_order()
        if self.num_replicas == 1:
            yield from grouped
            return
        global_batch = self.batch_size * self.num_replicas
        for start in range(0, len(grouped) - global_batch + 1, global_batch):
            mine = start + self.rank * self.batch_size
            yield from grouped[mine : mine + self.batch_size]


def trace_pieces(prompt_length: int, trace_lengths: list[int], max_tokens: int) -> list[list[int]]:
    """A question's traces in pieces of at most ``max_tokens`` tokens each (its prompt + the piece's traces), first
    fit decreasing; a trace longer than the budget is a piece alone. Each piece sorted, pieces by first trace."""
    return sorted(sorted(piece) for piece in first_fit_decreasing(trace_lengths, max(max_tokens - prompt_length, 0)))


def merge_pieces(share: list) -> list:
    """One rank's share with the pieces of one question merged into one item, in order of first appearance."""
    merged: dict[int, list[int] | None] = {}
    for item in share:
        index, piece = item if isinstance(item, tuple) else (item, None)
        if index in merged and merged[index] is not None and piece is not None:
            merged[index] = sorted(merged[index] + list(piece))
        else:
            merged[index] = None if piece is None else list(piece)
    return [index if piece is None else (index, tuple(piece)) for index, piece in merged.items()]


def token_budget_batches(order: list, lengths, max_tokens: int, num_replicas: int = 1) -> list[list[list]]:
    """Items in ``order`` (question indices, or ``(index, traces)`` pieces of questions) cut into global batches of at
    most ``num_replicas * max_tokens`` tokens (at least one item per rank; an item longer than the budget goes with
    no other), each split over the ranks by tokens: largest item first, to the rank with the fewest tokens so far.
    ``lengths[item]``: tokens of the item (prompt + its traces; a list by index or a dict). Returns
    ``batches[b][rank]`` = items; a trailing global batch with fewer items than ranks is dropped. The same on every
    rank (nothing random)."""
    budget = num_replicas * max_tokens
    cuts: list[list[int]] = []
    current: list[int] = []
    tokens = 0
    for index in order:
        if len(current) >= num_replicas and tokens + lengths[index] > budget:
            cuts.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += lengths[index]
    if len(current) >= num_replicas:
        cuts.append(current)
    batches = []
    for members in cuts:
        shares: list[list[int]] = [[] for _ in range(num_replicas)]
        loads = [0] * num_replicas
        for index in sorted(members, key=lambda i: -lengths[i]):
            rank = min(range(num_replicas), key=lambda r: (loads[r], r))
            shares[rank].append(index)
            loads[rank] += lengths[index]
        batches.append(shares)
    return batches


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
        trained=[q.trained for q in questions] if any(q.trained is not None for q in questions) else [],
    )
