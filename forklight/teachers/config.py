"""The ``sample:`` options: the teachers (:class:`Teacher`, a path or a mapping each), how vLLM runs them
(:class:`VLLMTeacherSettings`) and what is sampled (:class:`TeacherSampling`), each checked with a ConfigError that
names its ``sample.<key>``."""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from forklight.errors import ConfigError
from forklight.models import DTYPES, model_source
from forklight.teachers.store import store_file_name

KEY = "sample"  # the config key of these options (prepare's ``sample:`` block), named by every error
ENGINES = ("auto", "hf", "vllm")


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
