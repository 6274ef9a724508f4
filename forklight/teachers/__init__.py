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

Files: ``config.py`` (:class:`Teacher`, :class:`TeacherSampling`: the ``sample:`` options, checked), ``store.py``
(:class:`TeacherStore`: the resumable per-teacher store, the weights fingerprint), ``engines.py`` (:class:`HFSampler`,
:class:`VLLMSampler`: K seeded samples per prompt), ``sampling.py`` (:func:`sample_traces`: teacher after teacher,
what is not stored yet; :class:`SampleReport`).
"""

from forklight.teachers.config import (
    ENGINES,
    KEY,
    Teacher,
    TeacherSampling,
    VLLMTeacherSettings,
    as_teacher,
    check_teacher,
    teacher_name,
    teacher_weights_path,
)
from forklight.teachers.engines import (
    HFSampler,
    VLLMSampler,
    completion_of_tokens,
    free_memory,
    resolve_engine,
    stop_token_ids,
    vllm_import_error,
)
from forklight.teachers.sampling import (
    SampleReport,
    TeacherJob,
    TeacherReport,
    loading_bars,
    open_teacher,
    progress_bar,
    question_seed,
    sample_teacher,
    sample_traces,
)
from forklight.teachers.store import (
    FINGERPRINT_SUFFIXES,
    PIECE_BYTES,
    STORE_FORMAT,
    WHOLE_FILE_BYTES,
    StoredQuestion,
    StoredSample,
    TeacherStore,
    question_hash,
    store_file_name,
    weights_fingerprint,
)

__all__ = [
    "ENGINES", "FINGERPRINT_SUFFIXES", "KEY", "PIECE_BYTES", "STORE_FORMAT", "WHOLE_FILE_BYTES", "HFSampler",
    "SampleReport", "StoredQuestion", "StoredSample", "Teacher", "TeacherJob", "TeacherReport", "TeacherSampling",
    "TeacherStore", "VLLMSampler", "VLLMTeacherSettings", "as_teacher", "check_teacher", "completion_of_tokens",
    "free_memory", "loading_bars", "open_teacher", "progress_bar", "question_hash", "question_seed",
    "resolve_engine", "sample_teacher", "sample_traces", "stop_token_ids", "store_file_name", "teacher_name",
    "teacher_weights_path", "vllm_import_error", "weights_fingerprint",
]
