"""Never lose a run: bad input stops (or is skipped) at setup, training faults are counted, a killed run resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from forklight.cli import main
from forklight.data.datamodule import ForkDataModule, ToyTask
from forklight.data.records import RecordError
from forklight.data.rendering import load_tokenizer
from forklight.losses import LossParts
from forklight.rewards import gold_answer_parser
from tests.conftest import (
    CONFIGS,
    REPO,
    TINY_MODEL_CONFIG,
    fake_rollouts,
    grouped_row,
    tiny_export,
    tiny_gfpo,
    tiny_overrides,
    toy_batch,
    write_jsonl,
)

GOOD = {"id": "q0", "prompt": "12+30", "answer": "42", "traces": ["so 42", "40+2 = 42"]}
FLAT_GOOD = {"id": "q0", "prompt": "12+30", "answer": "42", "trace": "so 42"}


@lru_cache(maxsize=1)
def _ssft_module():
    from forklight.modules.ssft import SSFTModule

    return SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", num_fork_tokens=3)


# ---- bad input: every kind, through ForkDataModule.setup and the module's setup check -----------------------------
# (case, split the rows are for, rows, data options, line of the error, phrase, reason counted under skip)
BAD_INPUTS = [
    ("malformed-json", "train", [GOOD, '{"id": "q1", "prompt": '], {}, 2, "malformed JSON", "malformed_json"),
    ("not-utf8", "train", [GOOD, b'{"id": "q1", "prompt": "caf\xe9"}'], {}, 2, "not valid UTF-8 (byte 0xe9", "not_utf8"),
    ("missing-field", "train", [GOOD, grouped_row(prompt=None)], {}, 2, "neither 'prompt' nor 'messages'", "missing_field"),
    ("empty-field", "train", [GOOD, grouped_row(prompt="  ")], {}, 2, "'prompt' must be a non-empty string", "bad_field"),
    ("wrong-type", "train", [GOOD, grouped_row(traces=["so 2", 3])], {}, 2, "traces[1] must be a non-empty string",
     "bad_field"),
    ("empty-trace-list", "train", [GOOD, grouped_row(traces=[])], {}, 2, "field 'traces' is an empty list", "empty_traces"),
    ("duplicate-id", "train", [GOOD, grouped_row(id="q0", prompt="1+1")], {}, 2, "duplicate id 'q0' (first used at",
     "duplicate_id"),
    ("conflicting-duplicate", "train", [FLAT_GOOD, {**FLAT_GOOD, "prompt": "2+2"}], {}, 2,
     "question 'q0' conflicts with", "conflicting_duplicate"),
    ("too-few-traces", "train", [GOOD, grouped_row(traces=["so 2"])], {"min_traces": 2}, 2,
     "question has 1 traces, fewer than data.min_traces=2", "too_few_traces"),
    ("prompt-too-long", "train", [GOOD, grouped_row(prompt="1+" * 40 + "1")], {"max_length": 48}, 2,
     "leaving no room for a trace within data.max_length=48", "prompt_too_long"),
    ("unparseable-answer", "val", [GOOD, grouped_row(answer="forty-two")], {}, 2,
     "question 'q1' (val split) has a gold answer 'forty-two' that model.verifier cannot parse", "unparseable_answer"),
    ("missing-answer", "val", [GOOD, grouped_row(answer=None)], {}, 2, "question 'q1' (val split) has no gold answer",
     "missing_answer"),
]


def _setup(tmp_path: Path, split: str, rows: list, on_bad_record: str, **options) -> ForkDataModule:
    """Write the rows as ``split``'s file, then run the datamodule's and the module's setup validation."""
    paths = {"train": write_jsonl(tmp_path / "train.jsonl", [GOOD, grouped_row(id="q5")])}
    paths[split] = write_jsonl(tmp_path / f"{split}.jsonl", rows)
    data = ForkDataModule(train=paths["train"], val=paths.get("val"), tokenizer="toy", num_fork_tokens=3,
                          on_bad_record=on_bad_record, **options)
    data.setup("fit")
    module = _ssft_module()  # what the module hands over at setup
    data.check_gold_answers(gold_answer_parser(module.verifier, module.extract_answer), module.GOLD_ANSWER_SPLITS)
    return data


@pytest.mark.parametrize(("split", "rows", "options", "line", "phrase", "reason"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_names_what_where_and_how_or_is_skipped_and_counted(tmp_path, split, rows, options, line, phrase, reason):
    with pytest.raises(RecordError) as info:
        _setup(tmp_path, split, rows, "error", **options)
    message, path = str(info.value), str(tmp_path / f"{split}.jsonl")
    assert message.startswith(f"{path}:{line}: "), message  # where: file and line
    assert phrase in message and "; " in message, message  # what, then how to fix it
    assert info.value.reason == reason

    data = _setup(tmp_path, split, rows, "skip", **options)
    assert data.validation[split].skipped == {reason: 1}
    assert f"{split}: 1 questions; skipped: 1 {reason}" in data.validation_summary()
    assert [q.id for q in data.datasets[split].questions] == ["q0"]


def test_questions_with_more_traces_than_tags_are_sampled_and_reported():
    data = ForkDataModule(toy=ToyTask(num_train=32, num_val=2, num_test=2), num_fork_tokens=2)
    data.setup("fit")
    sampled = data.validation["train"].sampled_questions
    assert sampled > 0 and f"{sampled} questions with more traces than data.max_traces" in data.validation_summary()
    assert all(len(q.trace_ids) <= 2 for q in data.datasets["train"])


@pytest.mark.parametrize(("make", "phrase"), [
    (lambda: _module(num_fork_tokens=0), "model.num_fork_tokens must be >= 1, got 0"),
    (lambda: _module(fork_token_format="{i}"), "fork token names ['1', '2', '3'] already exist as ordinary tokens"),
    (lambda: _module(reward_timeout_s=0), "model.reward_timeout_s must be > 0 seconds or null"),
    (lambda: _module(on_nonfinite="ignore"), "model.on_nonfinite must be one of ('error', 'skip')"),
    (lambda: ForkDataModule(toy=ToyTask(), max_traces=0), "data.max_traces must be >= 1, got 0"),
    (lambda: ForkDataModule(toy=ToyTask(), min_traces=0), "data.min_traces must be >= 1, got 0"),
    (lambda: ForkDataModule(toy=ToyTask(), num_workers=-1), "data.num_workers must be >= 0"),
    (lambda: _setup_without_chat_template(), "the tokenizer has no chat template; set data.prompt_template"),
], ids=["no-fork-tokens", "fork-token-collision", "reward-timeout", "on-nonfinite", "max-traces", "min-traces",
        "num-workers", "no-chat-template"])
def test_bad_configuration_names_the_key(make, phrase):
    with pytest.raises(ValueError) as info:
        make()
    assert phrase in str(info.value)


def _module(**kwargs):
    from forklight.modules.ssft import SSFTModule

    return SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", **{"num_fork_tokens": 3, **kwargs})


def _setup_without_chat_template():
    data = ForkDataModule(toy=ToyTask(num_train=4, num_val=1, num_test=1))
    data.tokenizer = load_tokenizer("toy")
    data.tokenizer.chat_template = None
    data.setup("fit")


# ---- faults in training --------------------------------------------------------------------------------------------
def _hang(texts, answers, **columns):
    threading.Event().wait()  # never returns


def _raise(texts, answers, **columns):
    raise ZeroDivisionError("the user's verifier is broken")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize(("verifier", "counter"), [(_hang, "reward_timeouts"), (_raise, "reward_errors")])
def test_a_verifier_that_hangs_or_raises_scores_zero_and_is_counted(tmp_path, verifier, counter):
    module = tiny_gfpo(tmp_path, reward_timeout_s=0.5, max_new_tokens=3)
    module.rollouts = fake_rollouts(lambda tag: f"so {100 + tag}")
    module.verifier = verifier
    batch = toy_batch(2)
    started = time.perf_counter()
    update = module.prepare_update(batch, 0)  # rollouts of a training step
    assert time.perf_counter() - started < 10
    assert torch.all(update.rewards == 0) and torch.all(update.advantages == 0)
    assert module.fault_counts == {counter: 2 * 6}
    assert torch.isfinite(module.update_loss(update, 0).loss)

    evaluations = module.evaluator.evaluate_batch(batch)  # evaluation: every (question, tag) sample scores 0
    assert all(score == 0.0 for e in evaluations for row in e.scores for score in row)
    assert module.evaluator.faults == {counter: 2 * 3}


def test_hung_verifier_calls_do_not_pile_up(monkeypatch):
    from forklight import rewards

    monkeypatch.setattr(rewards, "MAX_HUNG_VERIFIER_CALLS", 2)
    monkeypatch.setattr(rewards, "_HUNG", [])
    release, calls = threading.Event(), []

    def hangs(texts, answers, **columns):
        calls.append(len(texts))
        release.wait()
        return [1.0] * len(texts)

    outcomes = [rewards.run_verifier(hangs, ["a", "b"], ["1", "2"], {}, timeout_s=0.05) for _ in range(4)]
    assert outcomes == [([0.0, 0.0], "timeout")] * 4 and len(calls) == 2  # the last two never started a thread
    release.set()
    for thread in rewards._HUNG:
        thread.join(5)
    assert rewards.run_verifier(hangs, ["a"], ["1"], {}, timeout_s=5) == ([1.0], "ok")  # finished calls free the slots


class _Poison(L.Callback):
    """Makes the module's loss NaN at one optimiser step and records the weights around it."""

    def __init__(self, module, method: str, step: int) -> None:
        self.step, self.weights = step, {}
        original = getattr(module, method)

        def poisoned(*args, **kwargs):
            result = original(*args, **kwargs)
            if module.global_step != step:
                return result
            if isinstance(result, LossParts):
                return dataclasses.replace(result, loss=result.loss * float("nan"))
            return (result[0] * float("nan"), *result[1:])

        setattr(module, method, poisoned)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.weights["before"] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self.weights["after"] = [p.detach().clone() for p in pl_module.parameters()]


def _nonfinite_module(kind: str, tmp_path: Path, on_nonfinite: str):
    if kind == "ssft":
        return _module(on_nonfinite=on_nonfinite), "matched_loss"
    module = tiny_gfpo(tmp_path, on_nonfinite=on_nonfinite)
    module.rollouts = fake_rollouts(lambda tag: f"so {100 + tag}")
    module.verifier = lambda texts, answers, **_: [1.0 if text == "so 101" else 0.0 for text in texts]
    return module, "update_loss"


@pytest.mark.parametrize("kind", ["ssft", "gfpo"])
@pytest.mark.parametrize("on_nonfinite", ["error", "skip"])
def test_a_nonfinite_loss_stops_naming_the_step_or_skips_the_update(tmp_path, kind, on_nonfinite):
    module, method = _nonfinite_module(kind, tmp_path, on_nonfinite)
    poison = _Poison(module, method, step=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[poison])
    data = ForkDataModule(toy=ToyTask(num_train=16, num_val=2, num_test=2), num_fork_tokens=3, batch_size=4)
    if on_nonfinite == "error":
        with pytest.raises(FloatingPointError, match=r"non-finite training loss \(nan\) at step 2, batch 2 "
                                                     r"\(question ids \['toy-\d+'.*model.on_nonfinite=skip"):
            trainer.fit(module, datamodule=data)
        return
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and module.fault_counts == {"nonfinite_skipped": 1}
    assert trainer.callback_metrics["train/nonfinite_skipped"] == 1
    assert all(torch.equal(a, b) for a, b in zip(poison.weights["before"], poison.weights["after"]))  # no update
    assert not all(torch.equal(a, b) for a, b in zip(poison.weights["after"], module.parameters()))  # later ones
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- checkpoints: atomic writes ------------------------------------------------------------------------------------
_DIE_WHILE_SAVING = """
import os, signal, sys, torch
from forklight.checkpointing import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"step": 1, "weights": torch.ones(1000)}, path)
def dying_save(obj, file, *args, **kwargs):  # the kill lands halfway through the write
    file.write(b"half a checkpoint" * 1000)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"step": 2, "weights": torch.zeros(1000)}, path)
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    from forklight.checkpointing import AtomicCheckpointIO

    path = tmp_path / "checkpoints" / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", _DIE_WHILE_SAVING, str(path)], cwd=REPO, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    assert torch.load(path, weights_only=True)["step"] == 1  # the previous checkpoint, intact
    assert len(list(path.parent.glob(".last.ckpt.*.tmp"))) == 1  # the half-written temporary file
    io = AtomicCheckpointIO()
    with pytest.raises(ZeroDivisionError):  # a save that fails in-process also keeps the old file
        io.save_checkpoint({"step": 3, "bad": _Unpicklable()}, path)
    assert torch.load(path, weights_only=True)["step"] == 1
    io.save_checkpoint({"step": 4}, path)
    assert torch.load(path, weights_only=True)["step"] == 4 and os.listdir(path.parent) == ["last.ckpt"]  # cleaned


class _Unpicklable:
    def __reduce__(self):
        raise ZeroDivisionError("cannot pickle")


def test_the_cli_installs_atomic_checkpoints(tmp_path):
    from forklight.checkpointing import AtomicCheckpointIO
    from forklight.cli import build_cli

    cli = build_cli(["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path)], run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ---- kill and resume -----------------------------------------------------------------------------------------------
class LossRecorder(L.Callback):
    """Appends ``{"step", "loss"}`` after every optimiser step (the logged ``train/loss``, exactly)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(trainer.callback_metrics["train/loss"])
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "loss": loss}) + "\n")


class KillAtStep(L.Callback):
    """SIGKILLs its own process after optimiser step ``step`` (no clean-up, like an OOM kill or a pre-emption)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def _callbacks(losses: Path, kill_at: int | None = None) -> str:
    callbacks = [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 2, "save_last": True}},
        {"class_path": "tests.test_faults.LossRecorder", "init_args": {"path": str(losses)}},
    ]
    if kill_at is not None:
        callbacks.append({"class_path": "tests.test_faults.KillAtStep", "init_args": {"step": kill_at}})
    return f"--trainer.callbacks={json.dumps(callbacks)}"


def _losses(path: Path) -> list[tuple[int, float]]:
    return [(row["step"], row["loss"]) for row in map(json.loads, path.read_text().splitlines())]


def _kill_and_resume(tmp_path: Path, config: str, extra: list[str]) -> None:
    """An uninterrupted run, and a run SIGKILLed after step 5 (checkpoints every 2 steps) then resumed with
    ``--ckpt_path last``: the same loss at every step, bitwise."""
    args = ["fit", "-c", str(CONFIGS / config), *extra]
    main([*args, *tiny_overrides(tmp_path / "whole", max_steps=8), _callbacks(tmp_path / "whole.jsonl")])
    reference = _losses(tmp_path / "whole.jsonl")
    assert [step for step, _ in reference] == list(range(1, 9)) and len({loss for _, loss in reference}) > 1

    killed = [*args, *tiny_overrides(tmp_path / "cut", max_steps=8)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "forklight", *killed, _callbacks(tmp_path / "cut.jsonl", kill_at=5)],
                            cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    run_dir = next((tmp_path / "cut").glob("*/version_0"))
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["epoch=0-step=4.ckpt", "last.ckpt"]

    main([*killed, _callbacks(tmp_path / "cut.jsonl"), "--ckpt_path=last"])
    cut = _losses(tmp_path / "cut.jsonl")
    assert [step for step, _ in cut] == [1, 2, 3, 4, 5, 5, 6, 7, 8]  # step 5 ran, was lost with the kill, ran again
    assert cut[:5] == reference[:5] and cut[5:] == reference[4:]  # bitwise equal
    assert not (run_dir.parent / "version_1").exists()  # the resumed run continued in its own directory
    saved = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)  # loads without unpickling code
    assert saved["global_step"] == 8 and saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [
        {"epoch": 0, "batches_served": 8}]  # the data order, saved with the loop


@pytest.mark.slow
def test_ssft_killed_mid_epoch_resumes_with_the_same_losses(tmp_path):
    _kill_and_resume(tmp_path, "ssft.yaml", [])


@pytest.mark.slow
def test_gfpo_killed_mid_epoch_resumes_with_the_same_losses(tmp_path):
    export = tiny_export(tmp_path)
    _kill_and_resume(tmp_path, "gfpo.yaml", [
        f"--model.init_args.init_from={export}", "--model.init_args.num_fork_tokens=3", "--model.init_args.group_size=3",
        "--model.init_args.max_completion_tokens=6", "--model.init_args.kl_coef=0.1", "--model.init_args.entropy_coef=0.1",
    ])


# ---- overlong traces: data.overlong = truncate | skip | error ------------------------------------------------------
LONG = "12+30=42. " * 3 + "so 42"  # 36 toy tokens with its end of turn: a row of 8 (prompt) + 1 (tag) + 36 > 24


@pytest.mark.parametrize("overlong", ["truncate", "skip", "error"])
def test_overlong_traces_are_truncated_skipped_or_stop_the_run(tmp_path, overlong):
    rows = [GOOD, grouped_row(id="q1", prompt="12+30", traces=["so 42", LONG]),
            grouped_row(id="q2", prompt="12+30", traces=[LONG])]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = ForkDataModule(train=path, tokenizer="toy", num_fork_tokens=3, max_length=24, overlong=overlong)
    if overlong == "error":
        with pytest.raises(RecordError) as info:
            data.setup("fit")
        message = str(info.value)
        assert message.startswith(f"{path}:2: trace 2 of question 'q1' is 36 tokens"), message  # where, how long
        assert "data.init_args.max_length=24" in message and "data.init_args.overlong" in message, message  # the keys
        assert info.value.reason == "overlong"
        return
    data.setup("fit")
    report, questions = data.validation["train"], {q.id: q for q in data.datasets["train"].questions}
    room = 24 - 8 - 1
    if overlong == "truncate":  # today's default: kept, cut to fit, and counted in traces and tokens
        assert (report.truncated_traces, report.truncated_tokens) == (2, 2 * (36 - room))
        assert [len(t) for t in questions["q1"].trace_ids] == [6, room] and set(questions) == {"q0", "q1", "q2"}
        assert f"2 traces truncated to data.max_length ({2 * (36 - room)} tokens cut)" in data.validation_summary()
    else:  # the trace is dropped; a question left without traces is skipped
        assert (report.dropped_traces, report.dropped_tokens) == (2, 2 * 36) and report.truncated_traces == 0
        assert [len(t) for t in questions["q1"].trace_ids] == [6] and set(questions) == {"q0", "q1"}
        assert report.skipped == {"overlong": 1}
        assert "2 overlong traces skipped (72 tokens)" in data.validation_summary()


def test_an_overlong_flat_trace_is_named_by_its_own_line(tmp_path):
    rows = [FLAT_GOOD, {**FLAT_GOOD, "trace": "40+2=42"}, {**FLAT_GOOD, "trace": LONG}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    data = ForkDataModule(train=path, tokenizer="toy", num_fork_tokens=3, max_length=24, overlong="error")
    with pytest.raises(RecordError, match=rf"^{path}:3: trace 3 of question 'q0' is 36 tokens"):
        data.setup("fit")


def test_bad_overlong_value_names_the_key():
    with pytest.raises(ValueError, match=r"data.overlong must be one of 'truncate', 'skip', 'error', got 'cut'"):
        ForkDataModule(toy=ToyTask(), overlong="cut")


def test_the_matching_error_names_the_config_keys():
    from forklight.matching import match_traces_to_tags

    with pytest.raises(ValueError) as info:
        match_traces_to_tags(np.zeros((2, 3)), "hungarian")
    assert "model.init_args.num_fork_tokens" in str(info.value) and "data.init_args.max_traces" in str(info.value)


def test_a_tokenizer_that_cannot_be_loaded_is_a_config_error_naming_the_key(tmp_path):
    from forklight.errors import ConfigError

    with pytest.raises(ConfigError, match=r"cannot load the tokenizer .*nope.*; check model.init_args.name_or_path"):
        load_tokenizer(str(tmp_path / "nope"))
