"""The token cache's key: where entries live and what names one (the data, the tokenizer, the options, the code).

:func:`entry_identity` gathers what decides a split's rendered ids; :func:`entry_key` hashes it and
:func:`entry_directory` places the entry under :func:`resolve_cache_dir`. The entries themselves, their build and
their use: :mod:`forklight.data.cache`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, is_dataclass
from functools import cache
from pathlib import Path
from typing import Any

from forklight.data.records import RecordError

CACHE_FORMAT = 1  # bump when the entry's layout changes
CACHE_DIR_ENV = "FORKLIGHT_CACHE_DIR"  # data.cache_dir: null -> this, else DEFAULT_CACHE_DIR
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "forklight", "tokens")
# ForkDataModule options that change what is rendered: each is part of the key.
KEY_OPTIONS = ("train", "val", "test", "predict", "toy", "benchmark", "tokenizer", "num_fork_tokens", "fields",
               "layout", "think", "on_bad_record", "val_size", "test_size", "prompt_template", "system_prompt",
               "end_token", "max_length", "overlong", "max_traces", "min_traces", "seed")
# The others only change how the cached questions are served (or where the cache is): not part of the key.
SERVING_OPTIONS = ("batch_size", "max_tokens_per_batch", "eval_batch_size", "num_workers", "num_proc", "cache",
                   "cache_dir", "trust_remote_code")
DATA_SOURCES = ("train", "val", "test", "predict")
# Modules whose code decides the rendered ids (reading, layouts, benchmarks, the toy task, rendering, validation).
RENDERING_MODULES = ("records", "loading", "layouts", "benchmarks", "toy", "rendering", "validation", "datamodule", "cache",
                     "cache_key", "cache_rendering")


# ---- where -------------------------------------------------------------------------------
def resolve_cache_dir(cache_dir: str | None) -> tuple[Path, str]:
    """The cache directory and what set it (for messages): ``data.cache_dir``, else ``$FORKLIGHT_CACHE_DIR``,
    else ``~/.cache/forklight/tokens``."""
    if cache_dir:
        return Path(cache_dir).expanduser(), f"data.init_args.cache_dir={cache_dir!r}"
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser(), f"${CACHE_DIR_ENV}={os.environ[CACHE_DIR_ENV]!r}"
    return Path(DEFAULT_CACHE_DIR).expanduser(), f"the default cache dir {DEFAULT_CACHE_DIR}"


# ---- the key -------------------------------------------------------------------------------
def entry_identity(options: dict[str, Any], tokenizer, cache_dir: Path) -> dict[str, Any]:
    """Everything the key hashes, JSON-serialisable: ``options`` (the values of :data:`KEY_OPTIONS`, the data
    sources replaced by fingerprints of their content), the tokenizer's fingerprint, the code and the versions."""
    memo = cache_dir / "file-hashes"
    benchmark = options.get("benchmark")
    identity = {name: _plain(value) for name, value in options.items()}
    for name in DATA_SOURCES:
        if name in options:
            # val/test/predict are read in the benchmark's layout; an unset test without train: its hub dataset
            layout = benchmark if name != "train" else None
            hub = layout is not None and name == "test" and options[name] is None and options.get("train") is None
            identity[name] = source_fingerprint(options[name], memo, layout, hub)
    return {"format": CACHE_FORMAT, "options": identity, "tokenizer": tokenizer_fingerprint(tokenizer),
            "code": code_fingerprint(), "libraries": library_versions()}


def entry_key(identity: dict[str, Any]) -> str:
    """The hash of an :func:`entry_identity` (hex, 20 characters)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]


def entry_directory(cache_dir: Path, identity: dict[str, Any]) -> Path:
    """``<cache_dir>/<name>-<key>``: the name says what data it is (the train file's, ``toy`` or the benchmark)."""
    options = identity["options"]
    train = options.get("train")
    name = (Path(str(train.get("path", "data"))).stem if isinstance(train, dict) else
            "toy" if options.get("toy") else options.get("benchmark") or "data")
    return cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)[:40]}-{entry_key(identity)}"


def source_fingerprint(path: str | None, memo: Path, benchmark: str | None = None,
                       hub: bool = False) -> dict[str, Any] | None:
    """What a data source holds: a file's bytes, every file of a local directory, or a ``datasets`` name's
    ``_fingerprint`` per split. ``benchmark``: the source is read in that benchmark's layout (a name: its config
    and split); ``hub``: an unset source is the benchmark's hub dataset."""
    if path is None and not hub:
        return None
    if path is not None and os.path.isfile(path):
        return {"path": path, "sha256": file_digest(path, memo)}
    if path is not None and os.path.isdir(path):
        files = sorted(str(Path(root, name).relative_to(path)) for root, _, names in os.walk(path) for name in names)
        return {"path": path, "files": {name: file_digest(os.path.join(path, name), memo) for name in files}}
    if path is not None and (os.path.isabs(path) or path.startswith(".") or
                             os.path.splitext(path)[1].lower() in (".jsonl", ".json", ".parquet")):
        return {"path": path, "missing": True}  # reading it raises the located error
    return {"path": path, "benchmark": benchmark, "datasets": hub_fingerprint(path, benchmark)}


def hub_fingerprint(path: str | None, benchmark: str | None) -> dict[str, str]:
    """``_fingerprint`` of each split of a ``datasets`` name (or of a benchmark's hub split)."""
    import datasets

    from forklight.data.benchmarks import BENCHMARKS

    if benchmark is not None:
        spec = BENCHMARKS[benchmark]
        name, config, split = path or spec.hub, spec.hub_config, spec.hub_split
    else:
        name, config, split = path, None, None
    try:
        loaded = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many kinds
        raise RecordError(f"{name}: cannot load it to fingerprint it for the token cache ({type(error).__name__}: "
                          f"{error}); give a .jsonl, .json or .parquet file, a local directory or a "
                          "datasets.load_dataset name, or set data.init_args.cache=false") from error
    if isinstance(loaded, datasets.Dataset):
        return {split: loaded._fingerprint}
    return {name: part._fingerprint for name, part in sorted(loaded.items())}


def file_digest(path: str, memo: Path | None = None) -> str:
    """sha256 of a file's bytes, kept in ``memo`` under the file's identity (device, inode, size, modification
    and change times, real path): a file not written since is not read again. A memo that cannot be written is
    skipped."""
    stat = os.stat(path)
    identity = "|".join(map(str, (os.path.realpath(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns,
                                  stat.st_ctime_ns)))
    kept = memo / hashlib.sha256(identity.encode()).hexdigest()[:32] if memo is not None else None
    if kept is not None and kept.is_file():
        with contextlib.suppress(OSError):
            digest = kept.read_text().strip()
            if re.fullmatch(r"[0-9a-f]{64}", digest):
                return digest
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while block := file.read(1 << 23):
            digest.update(block)
    if kept is not None:
        with contextlib.suppress(OSError):  # a read-only cache dir: re-hashed next time
            kept.parent.mkdir(parents=True, exist_ok=True)
            partial = kept.with_name(f"{kept.name}.{os.getpid()}.tmp")
            partial.write_text(digest.hexdigest())
            os.replace(partial, kept)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> dict[str, Any]:
    """What decides a tokenizer's ids: its class, its serialised definition (a fast tokenizer's ``to_str()``
    without the padding and truncation state a call may change; a slow one's vocabulary), its added and
    special tokens, its chat template and simple init options."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        if backend.padding is not None or backend.truncation is not None:  # a copy without them, the same bytes
            backend = type(backend).from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        serialised = backend.to_str()
    else:
        serialised = json.dumps(sorted(tokenizer.get_vocab().items()))
    added = sorted((index, str(token)) for index, token in getattr(tokenizer, "added_tokens_decoder", {}).items())
    options = {key: value for key, value in getattr(tokenizer, "init_kwargs", {}).items()
               if key != "name_or_path" and isinstance(value, (str, int, float, bool, type(None)))}
    return {"class": type(tokenizer).__name__, "definition": hashlib.sha256(serialised.encode()).hexdigest(),
            "added_tokens": hashlib.sha256(json.dumps(added).encode()).hexdigest(),
            "special_tokens": _plain(getattr(tokenizer, "special_tokens_map", {})),
            "chat_template": _plain(getattr(tokenizer, "chat_template", None)), "init": options}


@cache
def code_fingerprint() -> str:
    """sha256 of the source of :data:`RENDERING_MODULES`: a change to how data is read or rendered is a new key."""
    digest = hashlib.sha256()
    for name in RENDERING_MODULES:
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / f"{name}.py").read_bytes())
    return digest.hexdigest()


def library_versions() -> dict[str, str]:
    versions = {}
    for name in ("transformers", "tokenizers"):
        with contextlib.suppress(ImportError):
            versions[name] = __import__(name).__version__
    return versions


def _plain(value: Any) -> Any:
    """A config value as JSON-able data (a dataclass as a dict; jsonargparse namespaces too)."""
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value
