"""The monitoring callbacks through the real CLI: what they write to TensorBoard, and that a run
with them trains the very same weights as a run without them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from forklight.callbacks.specialization import conditional_entropy
from forklight.cli import main
from forklight.data.toy import STRATEGIES
from forklight.rollout import generate_completions
from tests.conftest import CONFIGS, TINY_MODEL_CONFIG, tiny_overrides

MONITORS = ("SpecializationMonitor", "EvaluationViews", "PerfMonitor", "GenerationProgress")
# Dropout makes training draw from the global RNG and depend on train/eval mode, so a callback
# that touched either would change the weights.
DROPOUT_MODEL = f"--model.init_args.model_config={json.dumps({**TINY_MODEL_CONFIG, 'attention_dropout': 0.2})}"


def _callbacks_overlay(path: Path, monitors: bool) -> Path:
    """An overlay replacing the callbacks of configs/ssft.yaml: the shipped list with short
    monitoring windows, or only the checkpoint (to compare the weights)."""
    callbacks = yaml.safe_load((CONFIGS / "ssft.yaml").read_text())["trainer"]["callbacks"]
    if monitors:
        names = [callback["class_path"].rsplit(".", 1)[-1] for callback in callbacks]
        assert set(MONITORS) <= set(names), "configs/ssft.yaml should list every monitor"
        for callback in callbacks:
            if callback["class_path"].endswith("SpecializationMonitor"):
                callback["init_args"] = {"every_n_steps": 2, "probe_questions": 2}
            if callback["class_path"].endswith("PerfMonitor"):
                callback["init_args"] = {"every_n_steps": 1}
    else:
        callbacks = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def _events(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sizes = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}
    return EventAccumulator(str(run_dir), size_guidance=sizes).Reload()


@pytest.fixture(scope="module")
def monitored_run(tmp_path_factory):
    """A 4-step toy SSFT fit with the shipped monitors (windows of 2 steps) and a progress bar."""
    root = tmp_path_factory.mktemp("monitored")
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), "-c", str(_callbacks_overlay(root / "callbacks.yaml", True)),
          *tiny_overrides(root, max_steps=4), DROPOUT_MODEL, "--trainer.enable_progress_bar=true"])
    return root / "ssft" / "version_0"


def test_conditional_entropy_by_hand():
    assert conditional_entropy(np.diag([3.0, 5.0, 0.0])) == 0.0  # every tag takes one source
    assert conditional_entropy(np.ones((2, 4))) == pytest.approx(math.log(4))  # tags ignore the source
    assert conditional_entropy(np.array([[2.0, 2.0], [4.0, 0.0]])) == pytest.approx(4 / 8 * math.log(2))  # row 1: 4 of 8 traces, 1 bit
    assert conditional_entropy(np.zeros((3, 2))) == 0.0


@pytest.mark.slow
def test_monitors_write_every_view(monitored_run):
    events = _events(monitored_run)
    tags = events.Tags()

    entropy = events.Scalars("fork/assignment_entropy")
    assert [e.step for e in entropy] == [2, 4]
    assert all(0.0 <= e.value <= math.log(len(STRATEGIES)) + 1e-6 for e in entropy)
    for tag in ("fork/assignments", "fork/cost/probe0", "fork/cost/probe1"):
        images = events.Images(tag)
        assert [image.step for image in images] == [2, 4], tag
        assert all(image.width > 50 and image.height > 50 for image in images)

    assert "views/tag_pass_len" in tags["images"]
    for tag in range(1, 7):
        histogram = events.Histograms(f"views/tag{tag}/len")[-1].histogram_value
        assert histogram.num == 4 and 1 <= histogram.min <= histogram.max <= 12  # 4 val questions, max_new_tokens 12
        text = events.Tensors(f"samples/tag{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()
        assert text.startswith("| question | gold | sample | completion | strategy | score |")
        assert len(text.splitlines()) == 2 + 3  # header + 3 sample questions x 1 sample

    perf = {key: [e.value for e in events.Scalars(f"perf/{key}")] for key in
            ("tokens_per_s", "samples_per_s", "mfu", "step_s/train", "peak_mem_mb")}
    assert all(len(values) == 4 for values in perf.values())  # every step (every_n_steps: 1)
    assert all(value > 0 for values in perf.values() for value in values)
    assert all(value < 1.5 for value in perf["mfu"])  # measured peak: a small model is far below it
    assert all(t > s for t, s in zip(perf["tokens_per_s"], perf["samples_per_s"]))


@pytest.mark.slow
def test_monitors_do_not_change_training(monitored_run, tmp_path):
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), "-c", str(_callbacks_overlay(tmp_path / "callbacks.yaml", False)),
          *tiny_overrides(tmp_path, max_steps=4), DROPOUT_MODEL])
    bare = torch.load(tmp_path / "ssft" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    watched = torch.load(monitored_run / "checkpoints" / "last.ckpt", weights_only=True)
    assert bare["global_step"] == watched["global_step"] == 4
    assert bare["state_dict"].keys() == watched["state_dict"].keys()
    for key, value in bare["state_dict"].items():
        assert torch.equal(value, watched["state_dict"][key]), key


@pytest.mark.slow
def test_gfpo_policy_views(monitored_run, tmp_path):
    overrides = [*tiny_overrides(tmp_path, max_steps=2), "--model.init_args.group_size=3",
                 "--model.init_args.max_completion_tokens=6"]
    main(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *overrides, f"--model.init_args.init_from={monitored_run / 'export'}"])
    events = _events(tmp_path / "gfpo" / "version_0")
    entropy = events.Scalars("fork/policy_entropy_val")
    assert len(entropy) == 1 and 0.0 <= entropy[0].value <= math.log(6) + 1e-6
    histogram = events.Histograms("fork/policy_hist")[-1].histogram_value
    assert histogram.num == 4 and 1 <= histogram.min <= histogram.max <= 6  # argmax tag of each val question
    assert "views/tag_pass_len" in events.Tags()["images"] and events.Scalars("perf/tokens_per_s")


def test_generation_reports_progress_after_each_chunk(tiny_ssft):
    module = tiny_ssft()
    calls = []
    prefixes = [[module.tokenizer.bos_token_id or 1, tag] for tag in module.fork_token_ids[:5]]
    completions = generate_completions(module.model, module.tokenizer, prefixes, module.stop_ids, 3,
                                       temperature=0.0, batch_size=2, progress=lambda done, total: calls.append((done, total)))
    assert len(completions) == 5 and calls == [(2, 5), (4, 5), (5, 5)]


def test_generation_progress_writes_on_the_active_bar():
    import io
    from types import SimpleNamespace

    from lightning.pytorch.callbacks import TQDMProgressBar
    from lightning.pytorch.trainer.states import RunningStage
    from tqdm import tqdm

    from forklight.callbacks import GenerationProgress

    bars = TQDMProgressBar()
    bars.val_progress_bar = tqdm(total=1, file=io.StringIO())
    trainer = SimpleNamespace(is_global_zero=True, state=SimpleNamespace(stage=RunningStage.VALIDATING),
                              progress_bar_callback=bars)
    module, callback = SimpleNamespace(), GenerationProgress()
    callback.setup(trainer, module, "fit")
    callback.on_generation_progress(trainer, module, 2, 5)
    assert bars.val_progress_bar.postfix == "generating 2/5"
    callback.on_generation_progress(trainer, module, 5, 5)
    assert not bars.val_progress_bar.postfix
    callback.teardown(trainer, module, "fit")
    assert not hasattr(module, "generation_progress")  # it observes: nothing is set on the module
