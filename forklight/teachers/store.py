"""Each teacher's resumable store ``<store_dir>/<name>.jsonl`` (:class:`TeacherStore`): a protocol header (the
weights' fingerprint, the sampling options), then one fsynced line per finished question (:class:`StoredQuestion`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forklight.data.records import QuestionRecord
from forklight.errors import ConfigError, UserError
from forklight.results import append_json_lines, cut_unfinished_line

STORE_FORMAT = "forklight-teacher-samples/1"


def store_file_name(name: str) -> str:
    """The store file of a teacher named ``name`` (characters other than letters, digits, ``._-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".jsonl"


def question_hash(record: QuestionRecord) -> str:
    """sha256 of a question's prompt and messages: a stored question whose text changed is sampled again."""
    return hashlib.sha256(json.dumps([record.prompt, record.messages], sort_keys=True).encode()).hexdigest()


FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".json", ".jinja", ".model", ".txt", ".tiktoken", ".py")
WHOLE_FILE_BYTES = 64 << 20  # files up to this size are hashed whole
PIECE_BYTES = 1 << 20  # larger ones: their first, middle and last MiB


def weights_fingerprint(path: str) -> str:
    """sha256 over a ``.gguf`` file, or a model directory's weight, config and tokenizer files: each file's name, size
    and bytes (a file over 64 MiB: its first, middle and last MiB), so a checkpoint of many GB is fingerprinted in
    milliseconds, and a copy of it elsewhere has the same fingerprint."""
    files = [Path(path)] if os.path.isfile(path) else sorted(
        p for p in Path(path).iterdir() if p.is_file() and p.suffix in FINGERPRINT_SUFFIXES)
    digest = hashlib.sha256()
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}\0{size}\0".encode())
        with open(file, "rb") as handle:
            if size <= WHOLE_FILE_BYTES:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
            else:
                for offset in (0, size // 2, size - PIECE_BYTES):
                    handle.seek(offset)
                    digest.update(handle.read(PIECE_BYTES))
    return digest.hexdigest()


@dataclass
class StoredSample:
    """One sampled completion as stored."""

    text: str
    length: int  # generated tokens, stop token included when present
    truncated: bool  # hit max_new_tokens without a stop token


@dataclass
class StoredQuestion:
    """A question's K samples from one teacher, as stored on line ``line`` of the teacher's store."""

    id: str
    question_sha256: str
    samples: list[StoredSample]
    line: int = 0


class TeacherStore:
    """One teacher's samples in ``path``: a header line with the protocol, then one line per finished question,
    appended and fsynced. A store made under another protocol is refused; a line cut by a kill is dropped (its
    question is sampled again)."""

    def __init__(self, path: Path, protocol: dict[str, Any], recorded: dict[str, Any]) -> None:
        """``protocol``: everything that decides the samples (compared on resume); ``recorded``: written, not
        compared (the teacher's path: a moved copy of the same weights has the same fingerprint)."""
        self.path, self.protocol = path, protocol
        self.finished: dict[str, StoredQuestion] = {}  # question id -> its samples (the last line wins)
        self.lines = 0
        rows = self._read_repaired()
        if not rows:
            header = {"format": STORE_FORMAT, "protocol": protocol, "recorded": recorded}
            path.parent.mkdir(parents=True, exist_ok=True)
            self._write([header], mode="w")
            return
        header = rows[0]
        if not (isinstance(header, dict) and header.get("format") == STORE_FORMAT):
            raise UserError(f"{path} is not a forklight teacher sample store (its first line has no "
                            f"\"format\": {STORE_FORMAT!r}); move it away or give another output directory")
        differ = {key: (header["protocol"].get(key), protocol.get(key))
                  for key in sorted(set(header["protocol"]) | set(protocol))
                  if header["protocol"].get(key) != protocol.get(key)}
        if differ:
            shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in differ.items())
            raise ConfigError(f"{path} holds samples of teacher {protocol['teacher']!r} made under another protocol "
                              f"({shown}); re-run with the settings it was made with to resume it, or delete {path} "
                              f"(or its directory) or give another output directory to sample afresh")
        for number, row in enumerate(rows[1:], 2):
            if isinstance(row, dict) and len(row.get("samples", ())) == protocol["num_samples"]:
                samples = [StoredSample(s["text"], s["length"], s["truncated"]) for s in row["samples"]]
                self.finished[row["id"]] = StoredQuestion(row["id"], row["question_sha256"], samples, number)

    def _read_repaired(self) -> list[Any]:
        """The stored lines, decoded (an undecodable line: None); a last line without its newline (a write cut by a
        kill) is cut off the file first, and a file holding no whole line is treated as new."""
        data = cut_unfinished_line(self.path)
        rows = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
        self.lines = len(rows)
        return rows

    def _write(self, rows: list[dict], mode: str = "a") -> None:
        append_json_lines(self.path, rows, mode)
        if mode == "w":  # the new file's directory entry is durable too
            descriptor = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        self.lines += len(rows)

    def append(self, questions: Sequence[StoredQuestion]) -> None:
        """Append whole questions (one line each) and fsync them; they count as finished from now on."""
        if not questions:
            return
        first = self.lines + 1
        self._write([{"id": q.id, "question_sha256": q.question_sha256,
                      "samples": [dataclasses.asdict(s) for s in q.samples]} for q in questions])
        for line, question in enumerate(questions, first):
            self.finished[question.id] = dataclasses.replace(question, line=line)
