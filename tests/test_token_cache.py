"""The token cache (``forklight.data.cache``, docs/token-cache.md): tokenise once, memory-map after.

A cached setup serves exactly what an uncached one does; a second setup re-uses the entry without reading or
tokenising; every kind of key change builds a new entry and serving options do not; a half-built or broken entry
is ignored; a 2-process run through the real CLI builds once and both ranks train on it.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import forklight.data.cache as cache_module
import forklight.data.cache_rendering as cache_rendering_module
import forklight.data.datamodule as datamodule_module
import forklight.data.validation as validation_module
from forklight.data.batching import LengthGroupedSampler
from forklight.data.cache import CachedQuestion, SplitTokens, publish
from forklight.data.cache_key import KEY_OPTIONS, SERVING_OPTIONS, resolve_cache_dir, source_fingerprint
from forklight.data.datamodule import ForkDataModule
from forklight.data.layouts import ThinkMarkup
from forklight.data.records import FieldNames, RecordError
from forklight.data.rendering import load_tokenizer, render_trace_ids
from forklight.data.toy import generate_toy_records
from forklight.data.validation import encode_traces
from forklight.errors import ConfigError
from tests.conftest import CONFIGS, REPO, tiny_overrides, write_jsonl


def _rows(count: int = 14) -> list[dict]:
    """Grouped rows with sources, extra columns, a long trace that max_length=48 truncates, and think markup."""
    return [{"id": f"q{i}", "prompt": f"{i}+{i}=?", "answer": str(2 * i), "level": i % 3,
             "traces": [{"text": f"so {2 * i}", "source": "direct"},
                        {"text": f"<think>{i}+{i}</think> so {2 * i}", "source": "running"},
                        {"text": "x" * (20 + 3 * i), "source": "long"}]} for i in range(count)]


def _train_file(tmp_path: Path, bad: bool = True) -> str:
    lines = _rows() + (['{"id": "bad", "prompt": 3, "traces": ["a"]}', '{"id": '] if bad else [])
    return write_jsonl(tmp_path / "train.jsonl", lines)


def _data(train: str, cache_dir: Path, **options) -> ForkDataModule:
    settings = dict(val_size=3, max_length=48, on_bad_record="skip", batch_size=4, max_traces=2, eval_batch_size=4,
                    cache_dir=str(cache_dir))
    return ForkDataModule(train=train, **(settings | options))


def _entries(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in cache_dir.iterdir() if p.is_dir() and p.name != "file-hashes")


def _questions(data: ForkDataModule, split: str) -> list[tuple]:
    return [(q.id, q.prompt_ids, q.trace_ids, q.sources, q.answer, q.columns, q.location)
            for q in data.datasets[split].questions]


def _batches(loader) -> list[tuple]:
    return [(b.ids, [p.tolist() for p in b.prompt_ids], [[t.tolist() for t in ts] for ts in b.trace_ids], b.sources,
             b.answers, b.columns, b.trained) for b in loader]


def _served(data: ForkDataModule) -> dict:
    """Everything the data module serves: questions, train batches of two epochs (traces drawn per epoch), the
    token-budget batches, evaluation batches, the counts and the summary."""
    loader = data.train_dataloader()
    epochs = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        epochs.append(_batches(loader))
    budget = LengthGroupedSampler(data.datasets["train"], 4, seed=0, max_tokens=60)
    return {"questions": {split: _questions(data, split) for split in data.datasets}, "train": epochs,
            "budget": budget.token_batches(), "lengths": loader.sampler.lengths,
            "val": _batches(data.val_dataloader()), "summary": data.validation_summary(),
            "counts": data.validation_counts()}


def test_cached_and_uncached_setups_serve_the_same_questions_batches_and_counts(tmp_path, caplog):
    train, cache_dir = _train_file(tmp_path), tmp_path / "cache"
    runs, warnings = {}, {}
    for name, cache in (("uncached", False), ("built", True), ("re-used", True)):
        data = _data(train, cache_dir, cache=cache)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            data.setup("fit")
        warnings[name] = [r.getMessage() for r in caplog.records if r.name.startswith("forklight.data")]
        runs[name] = _served(data)
    assert runs["uncached"]["questions"]["train"] and runs["uncached"]["questions"]["val"]
    assert "skipped: 1 bad_field, 1 malformed_json" in runs["uncached"]["summary"]
    assert "traces truncated to data.max_length" in runs["uncached"]["summary"]
    assert runs["built"] == runs["uncached"] and runs["re-used"] == runs["uncached"]
    assert any("were truncated" in message for message in warnings["uncached"])
    assert warnings["built"] == warnings["uncached"] and warnings["re-used"] == warnings["uncached"]  # replayed
    assert isinstance(data.datasets["train"].questions[0], CachedQuestion)  # metadata; ids stay in the mapped files
    assert len(_entries(cache_dir)) == 1


def test_a_second_setup_reuses_the_entry_without_reading_or_tokenising(tmp_path, monkeypatch):
    train, cache_dir = _train_file(tmp_path), tmp_path / "cache"
    first = _data(train, cache_dir)
    lines = []
    monkeypatch.setattr(datamodule_module, "rank_zero_info", lines.append)
    first.setup("fit")
    assert lines[0].startswith(f"forklight token cache: built {cache_dir}")

    def refuse(*args, **kwargs):
        raise AssertionError("a re-used entry must not read or tokenise the data")

    monkeypatch.setattr(cache_rendering_module, "render_records", refuse)
    monkeypatch.setattr(validation_module, "render_records", refuse)
    monkeypatch.setattr(ForkDataModule, "_read_splits", refuse)
    second = _data(train, cache_dir, batch_size=2, num_workers=0, eval_batch_size=8, num_proc=4)  # serving options
    second.setup("fit")
    assert lines[2].startswith(f"forklight token cache: re-used {cache_dir}")
    assert lines[3] == lines[1]  # the same validation summary
    assert _questions(second, "train") == _questions(first, "train")
    assert _entries(cache_dir) == [Path(lines[0].split()[4]).name]


def _with_tokenizer(change):
    def make(data: ForkDataModule) -> None:
        data.tokenizer = load_tokenizer("toy")
        change(data.tokenizer)
    return make


def _rewrite_a_trace(data: ForkDataModule) -> None:
    path = Path(data.hparams.train)
    path.write_text(path.read_text().replace('"so 0"', '"so O"'))  # same size, other bytes


KEY_CHANGES = {
    "file-content": ({}, _rewrite_a_trace),
    "tokenizer-added-token": ({}, _with_tokenizer(lambda tokenizer: tokenizer.add_tokens(["<extra>"]))),
    "tokenizer-chat-template": ({}, _with_tokenizer(lambda tokenizer: setattr(
        tokenizer, "chat_template", tokenizer.chat_template.replace("<|assistant|>", "<|assistant|>\n")))),
    "max_length": ({"max_length": 64}, None),
    "think": ({"think": ThinkMarkup(markup="strip")}, None),
    "fields": ({"fields": FieldNames(source="teacher")}, None),
    "layout": ({"layout": "grouped"}, None),
    "prompt_template": ({"prompt_template": "Q: {prompt} A:"}, None),
    "system_prompt": ({"system_prompt": "add"}, None),
    "end_token": ({"end_token": "<pad>"}, None),
    "num_fork_tokens": ({"num_fork_tokens": 2, "max_traces": None}, None),
    "max_traces": ({"max_traces": 3}, None),
    "min_traces": ({"min_traces": 2}, None),
    "overlong": ({"overlong": "skip"}, None),
    "on_bad_record": ({"on_bad_record": "error"}, None),
    "val_size": ({"val_size": 2}, None),
    "seed": ({"seed": 1}, None),
}


@pytest.mark.parametrize(("options", "change"), KEY_CHANGES.values(), ids=KEY_CHANGES.keys())
def test_each_kind_of_key_change_builds_a_new_entry(tmp_path, options, change):
    train, cache_dir = _train_file(tmp_path, bad=False), tmp_path / "cache"
    base = _data(train, cache_dir)
    base.setup("fit")
    (entry,) = _entries(cache_dir)
    changed = _data(train, cache_dir, **options)
    if change is not None:
        change(changed)
    changed.setup("fit")
    assert len(_entries(cache_dir)) == 2 and entry in _entries(cache_dir)
    again = _data(train, cache_dir, **options)  # a restart with the change re-uses the new entry
    if change is not None and change is not _rewrite_a_trace:
        change(again)
    again.setup("fit")
    assert len(_entries(cache_dir)) == 2
    assert _questions(again, "train") == _questions(changed, "train")


def test_every_option_is_in_the_key_or_only_serves():
    """A new data option must be classified: in the key (it changes the rendered ids) or serving only."""
    parameters = set(inspect.signature(ForkDataModule.__init__).parameters) - {"self"}
    assert set(KEY_OPTIONS) | set(SERVING_OPTIONS) == parameters
    assert not set(KEY_OPTIONS) & set(SERVING_OPTIONS)


def test_data_sources_are_fingerprinted_by_content(tmp_path):
    memo = tmp_path / "memo"
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text("one\n")
    (folder / "b.jsonl").write_text("two\n")
    first = source_fingerprint(str(folder), memo)
    assert source_fingerprint(str(folder), memo) == first and any(memo.iterdir())  # the memo answers
    (folder / "b.jsonl").write_text("twO\n")
    assert source_fingerprint(str(folder), memo) != first
    assert source_fingerprint(str(folder / "a.jsonl"), None) == source_fingerprint(str(folder / "a.jsonl"), memo)
    assert source_fingerprint(str(tmp_path / "missing.jsonl"), memo) == {"path": str(tmp_path / "missing.jsonl"),
                                                                         "missing": True}


def test_a_half_built_or_broken_entry_is_ignored_and_rebuilt(tmp_path, caplog):
    train, cache_dir = _train_file(tmp_path), tmp_path / "cache"
    reference = _data(train, cache_dir)
    reference.setup("fit")
    expected = _questions(reference, "train")  # read now: the damage below is to the files it maps
    (name,) = _entries(cache_dir)
    entry = cache_dir / name
    killed = cache_dir / f"{name}.tmp-host-1-dead"  # a build killed before its rename
    shutil.copytree(entry, killed)
    (killed / "entry.json").unlink()
    (killed / "train.tokens.npy").write_bytes(b"\0" * 10)
    with open(entry / "train.tokens.npy", "r+b") as file:  # the published entry damaged afterwards
        file.truncate(200)
    with caplog.at_level(logging.WARNING):
        data = _data(train, cache_dir)
        data.setup("fit")
    assert caplog.text.count("is unreadable") == 1 and "building it again" in caplog.text
    assert _questions(data, "train") == expected
    assert (cache_dir / name / "entry.json").is_file() and killed.is_dir()  # the temporary dir is left alone
    assert sorted(p.name for p in cache_dir.iterdir() if ".stale-" in p.name) == []


def test_of_two_concurrent_builders_the_first_published_entry_stays(tmp_path):
    train, cache_dir = _train_file(tmp_path), tmp_path / "cache"
    _data(train, cache_dir).setup("fit")
    (name,) = _entries(cache_dir)
    other = cache_dir / f"{name}.tmp-other-2-late"
    shutil.copytree(cache_dir / name, other)
    (other / "marker").write_text("the late builder's copy")
    publish(other, cache_dir / name)
    assert not other.exists() and not (cache_dir / name / "marker").exists()
    assert _entries(cache_dir) == [name]


def test_an_unwritable_cache_dir_is_a_located_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as info:
        _data(_train_file(tmp_path), blocker / "cache").setup("fit")
    message = str(info.value)
    assert "is not writable" in message and "data.init_args.cache_dir=" in message
    assert "data.init_args.cache=false" in message


def test_the_cache_dir_defaults_to_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKLIGHT_CACHE_DIR", str(tmp_path / "from-env"))
    data = ForkDataModule(train=_train_file(tmp_path), on_bad_record="skip", max_length=48)
    data.setup("fit")
    assert len(_entries(tmp_path / "from-env")) == 1
    monkeypatch.delenv("FORKLIGHT_CACHE_DIR")
    assert resolve_cache_dir(None)[0] == Path("~/.cache/forklight/tokens").expanduser()


def test_cached_questions_are_read_only_when_served(tmp_path, monkeypatch):
    data = _data(_train_file(tmp_path), tmp_path / "cache", max_tokens_per_batch=60)
    data.setup("fit")
    dataset = data.datasets["train"]
    assert pickle.loads(pickle.dumps(dataset))[0] == dataset[0]  # a DataLoader worker maps the files again
    assert len(pickle.dumps(dataset)) < 20_000  # ... and gets no token ids in the pickle

    def refuse(self, span):
        raise AssertionError("the sampler must take lengths from the offsets")

    monkeypatch.setattr(SplitTokens, "ids", refuse)
    sampler = data.train_dataloader().sampler
    assert sum(len(batch) for batch in sampler.token_batches()) >= 1 and len(sampler.lengths) == len(dataset)


def test_gold_answer_checks_filter_cached_questions_in_place(tmp_path):
    data = _data(_train_file(tmp_path), tmp_path / "cache")
    data.setup("fit")
    before = len(data.datasets["train"])
    data.check_gold_answers(lambda answer: None if answer == "4" else answer, ["train", "val"])
    kept = [q.id for split in ("train", "val") for q in data.datasets[split].questions]
    assert "q2" not in kept and len(kept) == before + 3 - 1
    assert "unparseable_answer" in data.validation_summary()


def test_batch_encoding_equals_one_text_at_a_time():
    tokenizer = load_tokenizer("toy")
    texts = ["so 46", "units 7+8=15 carry 1", "a  b\nc"]
    assert encode_traces(tokenizer, texts, 5) == [render_trace_ids(tokenizer, text, 5) for text in texts]


@pytest.mark.slow
def test_worker_processes_build_the_same_entry_and_keep_error_reasons(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_module, "CHUNK_CHARACTERS", 200)  # several chunks for the 2 workers
    train = _train_file(tmp_path)
    one, two = _data(train, tmp_path / "one", num_proc=1), _data(train, tmp_path / "two", num_proc=2)
    one.setup("fit")
    two.setup("fit")
    assert _served(one) == _served(two)
    rows = _rows() + [{"id": "few", "prompt": "1+1", "answer": "2", "traces": ["so 2"]}]
    with pytest.raises(RecordError) as info:  # raised in a worker, re-raised here with its reason
        _data(write_jsonl(tmp_path / "few.jsonl", rows), tmp_path / "two", num_proc=2, min_traces=2,
              on_bad_record="error").setup("fit")
    assert info.value.reason == "too_few_traces" and "few.jsonl:15" in str(info.value)


@pytest.mark.slow
def test_a_two_process_run_builds_the_entry_once_and_both_ranks_train_on_it(tmp_path):
    rows = [{"id": r.id, "prompt": r.prompt, "answer": r.answer,
             "traces": [{"text": t.text, "source": t.source} for t in r.traces]} for r in generate_toy_records(40, 3)]
    train, cache_dir = write_jsonl(tmp_path / "train.jsonl", rows), tmp_path / "cache"

    def fit(root: Path, *strategy: str) -> str:
        command = [sys.executable, "-m", "forklight", "fit", "-c", str(CONFIGS / "ssft.yaml"), *strategy,
                   *tiny_overrides(root), "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
                   "--data.init_args.batch_size=2", f"--data.init_args.train={train}", "--data.init_args.val_size=4",
                   f"--data.init_args.cache_dir={cache_dir}"]
        environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{' '.join(command)}\n{output[-6000:]}"
        return output

    output = fit(tmp_path / "ddp", "-c", str(CONFIGS / "strategies" / "ddp.yaml"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    assert output.count("forklight token cache: built") == 1 and "token cache: re-used" not in output
    assert "built the token cache entry itself" not in output  # rank 1 mapped rank 0's entry
    (entry,) = _entries(cache_dir)
    assert not [p for p in cache_dir.iterdir() if ".tmp-" in p.name]
    from tests.test_distributed import scalars

    assert len(scalars(tmp_path / "ddp" / "ssft" / "version_0")["train/loss"]) == 2  # 2 DDP steps: both ranks
    again = fit(tmp_path / "again", "-c", str(CONFIGS / "strategies" / "ddp.yaml"))
    assert f"forklight token cache: re-used {cache_dir / entry}" in again and _entries(cache_dir) == [entry]
