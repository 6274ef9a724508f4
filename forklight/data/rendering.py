"""Rendering and tokenisation: records to token ids, and token ids to padded model rows.

A training row is ``[prompt | tag | trace | end-of-turn]`` (DESIGN.md §3): the prompt is the
tokenizer's chat template with the generation prompt (or ``prompt_template``), the tag is one
forking token, and the trace is tokenised on its own so no token merges across a boundary.
Labels mask the prompt and the tag; the trace and the end-of-turn token are supervised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from forklight.data.records import QuestionRecord
from forklight.errors import ConfigError

IGNORE_INDEX = -100  # label of positions that get no loss (PyTorch/HF convention)
TOY_TOKENIZER = "toy"  # name of the embedded character tokenizer of the toy task


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The toy character tokenizer (``"toy"``), a GGUF file's tokenizer (a path ending ``.gguf``),
    or ``AutoTokenizer.from_pretrained(name_or_path)``."""
    if name_or_path == TOY_TOKENIZER:
        from forklight.data.toy import build_toy_tokenizer

        return build_toy_tokenizer()
    from transformers import AutoTokenizer

    kwargs = {}
    try:
        if name_or_path.endswith(".gguf"):
            from forklight.models import check_gguf, model_source

            check_gguf(name_or_path, None, key="tokenizer")
            name_or_path, kwargs["gguf_file"] = model_source(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as error:  # not a local dir, not on the hub, or offline: the user's name, not a bug
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"cannot load the tokenizer {name_or_path!r} ({reason}); check model.init_args.name_or_path "
                          "(or model.init_args.tokenizer)") from error
    if tokenizer.pad_token_id is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _token_ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a list or a mapping, by version."""
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def render_prompt_ids(
    tokenizer, record: QuestionRecord, prompt_template: str | None = None, system_prompt: str | None = None
) -> list[int]:
    """Token ids of the prompt, ending where the assistant's answer (the tag) starts."""
    if prompt_template is not None:
        text = record.prompt if record.prompt is not None else "\n".join(m["content"] for m in record.messages or [])
        return tokenizer(prompt_template.format(prompt=text), add_special_tokens=True)["input_ids"]
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; set data.prompt_template (e.g. 'Question: {prompt}\\nAnswer: ')"
        )
    messages = list(record.messages) if record.messages else [{"role": "user", "content": record.prompt or ""}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return _token_ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def end_of_turn_id(tokenizer, end_token: str | None = None) -> int:
    """Id of the token that ends an answer: ``end_token`` if given, else the tokenizer's EOS."""
    token = end_token if end_token is not None else tokenizer.eos_token
    if token is None:
        raise ConfigError("the tokenizer has no EOS token; set data.end_token to the end-of-turn token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise ConfigError(f"data.end_token {token!r} is not a single token of the tokenizer")
    return token_id


def render_trace_ids(tokenizer, text: str, end_id: int) -> list[int]:
    """Token ids of a trace followed by the end-of-turn token."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_id]


@dataclass
class RenderedQuestion:
    """A question tokenised once at setup (by ``forklight.data.validation.render_questions``)."""

    id: str
    prompt_ids: list[int]
    trace_ids: list[list[int]]  # each: trace + end-of-turn
    sources: list[str | None]
    answer: str | None
    columns: dict
    location: str = ""  # where the question came from, e.g. "train.jsonl:12"
    trained: list[int] | None = None  # the traces this batch trains, when a token budget split the question; None: all


@dataclass
class TraceSetBatch:
    """A batch of questions, each with its prompt and its set of traces (token ids)."""

    ids: list[str]  # question ids, [B]
    prompt_ids: list[torch.Tensor]  # B tensors [P_b]: rendered prompt, generation prompt included
    trace_ids: list[list[torch.Tensor]]  # B lists of M_b tensors [L_bj]: trace + end-of-turn
    sources: list[list[str | None]]  # B lists of M_b trace sources
    answers: list[str | None]  # gold answers, [B]
    columns: list[dict[str, Any]] = field(default_factory=list)  # other fields per question
    # B entries: the indices of the traces this batch trains (a piece of a question longer than
    # data.max_tokens_per_batch: all its traces are matched, these are trained), None: all; [] = all, every question
    trained: list[list[int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def trains(self, question: int, trace: int) -> bool:
        """Whether this batch trains trace ``trace`` of its question ``question`` (:attr:`trained`)."""
        return not self.trained or self.trained[question] is None or trace in self.trained[question]

    def select(self, indices: Sequence[int]) -> TraceSetBatch:
        """The batch of questions ``indices`` (in that order)."""
        def pick(values: list) -> list:
            return [values[i] for i in indices] if values else []

        return TraceSetBatch(ids=pick(self.ids), prompt_ids=pick(self.prompt_ids), trace_ids=pick(self.trace_ids),
                             sources=pick(self.sources), answers=pick(self.answers), columns=pick(self.columns),
                             trained=pick(self.trained))

    @property
    def split(self) -> bool:
        """Whether some question of this batch trains only some of its traces (the rest in other batches)."""
        return any(piece is not None for piece in self.trained)


@dataclass
class Rows:
    """Right-padded model rows built from (prompt, prefix tokens, continuation) triples.

    No attention mask: under causal attention no real token of a right-padded row sees a pad, and
    pads get no loss (``tests/test_ssft.py`` checks the masked and unmasked losses agree).
    """

    input_ids: torch.Tensor  # [R, T]
    labels: torch.Tensor  # [R, T], IGNORE_INDEX on prompt, tag and padding
    position_ids: torch.Tensor | None = None  # [R, T] of packed rows (restart at 0 per sequence); None: 0..T-1


def assemble_rows(
    prompts: Sequence[torch.Tensor],
    tags: Sequence[int],
    continuations: Sequence[torch.Tensor],
    pad_id: int,
) -> Rows:
    """Rows ``[prompt | tag | continuation]`` with only the continuation supervised."""
    pieces, supervised = [], []
    for prompt, tag, continuation in zip(prompts, tags, continuations, strict=True):
        tag_tensor = torch.tensor([tag], dtype=prompt.dtype, device=prompt.device)
        pieces.append(torch.cat([prompt, tag_tensor, continuation]))
        supervised.append(len(prompt) + 1)
    length = max(len(piece) for piece in pieces)
    device = pieces[0].device
    input_ids = torch.full((len(pieces), length), pad_id, dtype=torch.long, device=device)  # [R, T]
    labels = torch.full((len(pieces), length), IGNORE_INDEX, dtype=torch.long, device=device)  # [R, T]
    for row, (piece, start) in enumerate(zip(pieces, supervised)):
        input_ids[row, : len(piece)] = piece
        labels[row, start : len(piece)] = piece[start:]
    return Rows(input_ids=input_ids, labels=labels)


def pack_rows(
    prompts: Sequence[torch.Tensor],
    tags: Sequence[int],
    continuations: Sequence[torch.Tensor],
    pad_id: int,
    pack_length: int | None = None,
) -> Rows:
    """The sequences ``[prompt | tag | continuation]`` of :func:`assemble_rows`, packed end to end into as few
    rows of ``pack_length`` tokens as first-fit decreasing finds (default: the longest sequence's length; a longer
    sequence gets a row of its own), with ``position_ids`` restarting at 0 for each sequence, so that attention
    (transformers' block-diagonal mask from packed positions, or varlen kernels) never crosses sequences.

    Each row is right-padded to the longest row (the pads form a sequence of their own, never supervised). The
    label of a sequence's last token predicts nothing across the boundary: the next sequence starts with its
    prompt, which is never supervised. Returns input_ids, labels and position_ids, each [P, L].
    """
    pieces = [torch.cat([prompt, torch.tensor([tag], dtype=prompt.dtype, device=prompt.device), continuation])
              for prompt, tag, continuation in zip(prompts, tags, continuations, strict=True)]
    sizes = [len(piece) for piece in pieces]
    bins = first_fit_decreasing(sizes, max(pack_length or 0, max(sizes)))  # sequence indices of each packed row
    length = max(sum(sizes[i] for i in members) for members in bins)
    device = pieces[0].device
    input_ids = torch.full((len(bins), length), pad_id, dtype=torch.long, device=device)  # [P, L]
    labels = torch.full((len(bins), length), IGNORE_INDEX, dtype=torch.long, device=device)  # [P, L]
    position_ids = torch.zeros((len(bins), length), dtype=torch.long, device=device)  # [P, L]
    for row, members in enumerate(bins):
        offset = 0
        for index in members:
            piece, start = pieces[index], len(prompts[index]) + 1
            input_ids[row, offset : offset + len(piece)] = piece
            labels[row, offset + start : offset + len(piece)] = piece[start:]
            position_ids[row, offset : offset + len(piece)] = torch.arange(len(piece), device=device)
            offset += len(piece)
        position_ids[row, offset:] = torch.arange(length - offset, device=device)  # the pads: a sequence of their own
    return Rows(input_ids=input_ids, labels=labels, position_ids=position_ids)


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in bins of at most ``capacity`` (a longer item gets a bin of its own), first fit
    decreasing: longest first, each into the first bin with room."""
    bins: list[list[int]] = []
    room: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, left in enumerate(room) if left >= lengths[index]), None)
        if row is None:
            bins.append([])
            room.append(max(capacity, lengths[index]))
            row = len(bins) - 1
        bins[row].append(index)
        room[row] -= lengths[index]
    return bins


@dataclass
class PackedRows:
    """Right-padded rows packed end to end (:func:`repack_rows`) and where each packed position came from."""

    rows: Rows  # [P, L] input_ids, labels and restarting position_ids
    source_row: torch.Tensor  # [P, L]: the row of the padded layout each position came from (-1: a pad)
    source_position: torch.Tensor  # [P, L]: its position in that row (-1: a pad)


def repack_rows(rows: Rows, pad_id: int, pack_length: int | None = None) -> PackedRows:
    """Right-padded ``rows`` [R, T] (labels -100 where unsupervised) packed as :func:`pack_rows` packs: each row's
    sequence runs to its last supervised label (a row with none keeps one token and no loss), first-fit decreasing
    into rows of ``pack_length`` tokens (default: the longest sequence's), ``position_ids`` restarting per sequence.
    A packed position's label is the label it had, so the NLL of a packed scored position lands back on its row
    and position through ``source_row``/``source_position``."""
    num_rows, width = rows.labels.shape
    supervised = rows.labels != IGNORE_INDEX  # [R, T]
    last = width - 1 - supervised.flip(1).int().argmax(1)  # [R]: the last supervised position (T - 1 if none)
    lengths = torch.where(supervised.any(1), last + 1, torch.ones_like(last)).tolist()  # [R]
    bins = first_fit_decreasing(lengths, max(pack_length or 0, max(lengths)))
    length = max(sum(lengths[i] for i in members) for members in bins)
    device = rows.input_ids.device
    shape = (len(bins), length)
    input_ids = torch.full(shape, pad_id, dtype=torch.long, device=device)  # [P, L]
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=device)  # [P, L]
    position_ids = torch.zeros(shape, dtype=torch.long, device=device)  # [P, L]
    source_row = torch.full(shape, -1, dtype=torch.long, device=device)  # [P, L]
    source_position = torch.full(shape, -1, dtype=torch.long, device=device)  # [P, L]
    for packed, members in enumerate(bins):
        offset = 0
        for row in members:
            n = lengths[row]
            span = slice(offset, offset + n)
            input_ids[packed, span] = rows.input_ids[row, :n]
            labels[packed, span] = rows.labels[row, :n]
            position_ids[packed, span] = torch.arange(n, device=device)
            source_row[packed, span] = row
            source_position[packed, span] = torch.arange(n, device=device)
            offset += n
        position_ids[packed, offset:] = torch.arange(length - offset, device=device)  # the pads: a sequence of their own
    return PackedRows(Rows(input_ids=input_ids, labels=labels, position_ids=position_ids), source_row, source_position)


def left_padded_prompts(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``input_ids`` [R, T] and ``attention_mask`` [R, T] for generation."""
    length = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.as_tensor(prompt, dtype=torch.long)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)
