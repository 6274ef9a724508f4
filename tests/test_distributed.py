"""Scale-out (DESIGN.md §7): DDP and FSDP2 with two CPU processes (gloo) through the real CLI.

Each distributed run trains 2 processes x ``data.batch_size`` 2 and is compared with one process
with batch 4 on the same toy questions: the per-step losses, the trained weights, the tag
coverage and the evaluation metrics must agree (float tolerance: the gradient all-reduce sums in
another order). FSDP2 also resumes from a sharded mid-epoch checkpoint, and its export (weights
gathered from the shards) must equal the consolidated sharded checkpoint and reload with plain
``transformers``. ``fsdp.yaml`` (FSDP1) needs CUDA: only its wrap policy is checked here.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forklight.data.batching import LengthGroupedSampler, QuestionDataset
from forklight.data.rendering import RenderedQuestion
from forklight.losses import data_parallel_token_mean, summed_nll
from forklight.sharding import TransformerBlockWrapPolicy, block_class_names, transformer_blocks
from tests.conftest import CONFIGS, REPO, TINY_MODEL_CONFIG, tiny_overrides

LOSS_TOLERANCE = dict(rel=1e-5, abs=1e-6)  # per-step losses, distributed vs one process
WEIGHT_TOLERANCE = 1e-5  # max |difference| of any trained weight after the run
METRIC_TOLERANCE = 1e-6  # evaluation metrics (the same completions: equal up to float summation)


# ---- helpers the runs load by import path (``model.verifier``, ``model.strategy_classifier``) ----
def contains_a_digit(completions, answers, **columns):
    """A verifier with mixed scores on a barely trained model, so every metric is informative."""
    return [float(any(character.isdigit() for character in text)) for text in completions]


def first_character(completion: str) -> str | None:
    """A 'strategy' for the purity metric: the completion's first character."""
    return completion[:1] or None


# ---- pure pieces -------------------------------------------------------------------------
def _questions(count: int) -> QuestionDataset:
    questions = [RenderedQuestion(id=f"q{i}", prompt_ids=[1] * (i % 7 + 1), trace_ids=[[2] * (i % 5 + 1)],
                                  sources=[None], answer="1", columns={}) for i in range(count)]
    return QuestionDataset(questions, max_traces=None, seed=0)


def test_length_grouped_sampler_gives_each_rank_its_share_of_each_global_batch():
    dataset, batch = _questions(37), 2
    single = list(LengthGroupedSampler(dataset, batch * 2, seed=3, window_batches=2))
    ranks = [list(LengthGroupedSampler(dataset, batch, seed=3, window_batches=2, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 36 // 4 * 2  # the trailing partial global batch is dropped
    assert not set(ranks[0]) & set(ranks[1])  # each question on one rank
    for step in range(9):  # global batch k of 2 ranks x 2 = batch k of 1 process x 4
        together = ranks[0][step * batch : (step + 1) * batch] + ranks[1][step * batch : (step + 1) * batch]
        assert together == single[step * 4 : (step + 1) * 4]
    sampler = LengthGroupedSampler(dataset, batch, seed=3, num_replicas=2, rank=1)
    sampler.set_epoch(1)
    assert list(sampler) != ranks[1] and dataset.epoch == 1  # reshuffled, traces redrawn per epoch
    assert isinstance(sampler, torch.utils.data.DistributedSampler)  # Lightning does not re-wrap it


def test_data_parallel_token_mean_averaged_over_ranks_is_the_global_token_mean():
    torch.manual_seed(0)
    logits = torch.randn(4, 6, 9, requires_grad=True)  # 4 rows, 2 per rank
    labels = torch.randint(0, 9, (4, 6))
    labels[0, :4] = labels[3, :2] = -100  # ranks supervise different numbers of tokens
    nll, tokens = summed_nll(logits, labels)
    (nll / tokens).backward()
    expected = logits.grad.clone()
    logits.grad = None
    per_rank = [summed_nll(logits[rows], labels[rows]) for rows in (slice(0, 2), slice(2, 4))]
    global_tokens = sum(count for _, count in per_rank)
    averaged = sum(data_parallel_token_mean(s, global_tokens, 2) for s, _ in per_rank) / 2  # DDP's mean
    averaged.backward()
    assert torch.allclose(logits.grad, expected, atol=1e-7)


def test_block_policy_finds_the_models_transformer_blocks():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper, apply_activation_checkpointing
    from transformers import AutoConfig, AutoModelForCausalLM

    config = dict(TINY_MODEL_CONFIG)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), vocab_size=50, **config))
    assert block_class_names(model) == {"LlamaDecoderLayer"}  # from _no_split_modules
    assert len(transformer_blocks(model)) == 2
    targets = TransformerBlockWrapPolicy()._run_policy(model, set(), {})  # how FSDP applies it
    assert sorted(type(module).__name__ for module in targets) == ["LlamaDecoderLayer"] * 2
    apply_activation_checkpointing(model, auto_wrap_policy=TransformerBlockWrapPolicy())  # the callable form
    assert sum(isinstance(module, CheckpointWrapper) for module in model.modules()) == 2
    with pytest.raises(ValueError, match="shard_block_classes"):
        transformer_blocks(model, ["NoSuchBlock"])


# ---- the real CLI, two processes -------------------------------------------------------
def fit(config: str, root: Path, *overrides: str, strategy: str | None = None, max_steps: int = 3) -> Path:
    """``forklight fit`` in a subprocess (two processes with a strategy); returns the logger's root."""
    stack = ["-c", str(CONFIGS / config)] + (["-c", str(CONFIGS / "strategies" / f"{strategy}.yaml")] if strategy else [])
    command = [sys.executable, "-m", "forklight", "fit", *stack, *tiny_overrides(root, max_steps=max_steps),
               "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0",
               "--model.init_args.verifier=tests.test_distributed:contains_a_digit",
               "--model.init_args.strategy_classifier=tests.test_distributed:first_character",
               "--model.init_args.warmup_steps=0", "--model.init_args.min_lr_ratio=1.0",  # constant lr: resumable
               f"--data.init_args.batch_size={2 if strategy else 4}", *overrides]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return root


def scalars(run: Path) -> dict[str, list[float]]:
    """TensorBoard scalars of one run directory: tag -> values in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [event.value for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def exported_weights(export: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export).state_dict()  # plain transformers


def assert_same_weights(expected: dict, actual: dict, tolerance: float) -> None:
    assert sorted(expected) == sorted(actual)
    worst = max((expected[key].float() - actual[key].float()).abs().max().item() for key in expected)
    assert worst <= tolerance, f"weights differ by up to {worst}"


def assert_same_evaluation(expected: dict, actual: dict) -> None:
    keys = sorted(key for key in expected if key.startswith("val/"))
    assert keys and keys == sorted(key for key in actual if key.startswith("val/"))
    for key in keys:
        assert actual[key][-1] == pytest.approx(expected[key][-1], abs=METRIC_TOLERANCE), key
    informative = [key for key in keys if key.startswith("val/pass@") and 0 < expected[key][-1] < 1]
    assert informative, "every pass rate is 0 or 1: the comparison would prove little"


@pytest.fixture(scope="module")
def ssft_runs(tmp_path_factory):
    """SSFT: one process (batch 4, 3 steps, full logits), DDP and FSDP2 (2 x 2), and FSDP2 resumed from its
    sharded step-2 checkpoint (saved mid-epoch by an extra ModelCheckpoint)."""
    tmp = tmp_path_factory.mktemp("ssft")
    mid_epoch = tmp / "checkpoint_every_2_steps.yaml"
    mid_epoch.write_text(
        "trainer:\n  callbacks+:\n    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp / 'mid'}, every_n_train_steps: 2, save_top_k: -1}}\n"
    )
    small_steps = "--model.init_args.learning_rate=1e-4"  # the model moves but keeps diverse outputs to evaluate
    # The single process takes the full-logits loss (the path before model.loss_head), the others the default
    # chunked one: the comparisons below also show that the chunked loss trains the same under DDP and FSDP2.
    runs = {"single": fit("ssft.yaml", tmp / "single", small_steps, "--model.init_args.loss_head=full"),
            "ddp": fit("ssft.yaml", tmp / "ddp", small_steps, strategy="ddp"),
            "fsdp2": fit("ssft.yaml", tmp / "fsdp2", small_steps, "-c", str(mid_epoch), strategy="fsdp2")}
    step_2 = tmp / "mid" / "epoch=0-step=2.ckpt"
    assert step_2.is_dir() and len(glob.glob(str(step_2 / "*.distcp"))) == 2  # one shard file per rank
    runs["fsdp2_resumed"] = fit("ssft.yaml", tmp / "fsdp2_resumed", small_steps, f"--ckpt_path={step_2}", strategy="fsdp2")
    return {name: root / "ssft" / "version_0" for name, root in runs.items()}


@pytest.mark.slow
def test_ssft_ddp_and_fsdp2_step_like_one_process_with_the_global_batch(ssft_runs):
    single = scalars(ssft_runs["single"])
    assert len(single["train/loss"]) == 3
    for name in ("ddp", "fsdp2"):
        assert scalars(ssft_runs[name])["train/loss"] == pytest.approx(single["train/loss"], **LOSS_TOLERANCE), name
    resumed = scalars(ssft_runs["fsdp2_resumed"])["train/loss"]
    assert resumed == pytest.approx(single["train/loss"][2:], **LOSS_TOLERANCE)  # step 3 after the sharded resume
    reference = exported_weights(ssft_runs["single"] / "export")
    coverage = json.loads((ssft_runs["single"] / "export" / "forklight.json").read_text())["tag_coverage"]
    assert sum(coverage) == 3 * 4 * 4  # 3 steps x 4 questions x 4 traces
    for name in ("ddp", "fsdp2", "fsdp2_resumed"):
        assert_same_weights(reference, exported_weights(ssft_runs[name] / "export"), WEIGHT_TOLERANCE)
        metadata = json.loads((ssft_runs[name] / "export" / "forklight.json").read_text())
        assert metadata["tag_coverage"] == coverage, name  # usage summed over ranks: the same default tag


@pytest.mark.slow
def test_fsdp2_export_is_the_consolidated_sharded_checkpoint(ssft_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = ssft_runs["fsdp2_resumed"]
    sharded = run / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()
    dcp_to_torch_save(sharded, tmp_path / "consolidated.pt")
    checkpoint = torch.load(tmp_path / "consolidated.pt", weights_only=True)["state_dict"]
    consolidated = {key[len("model."):]: value for key, value in checkpoint.items() if key.startswith("model.")}
    exported = exported_weights(run / "export")
    assert sorted(exported) == sorted(consolidated)
    assert all(torch.equal(exported[key], consolidated[key]) for key in exported)  # bit for bit
    config = json.loads((run / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # not FSDP2's FSDPLlamaForCausalLM


@pytest.mark.slow
def test_evaluation_under_ddp_and_fsdp2_equals_one_process(ssft_runs):
    single = scalars(ssft_runs["single"])
    for name in ("ddp", "fsdp2_resumed"):  # 4 validation questions, 2 per rank, generated on each rank
        assert_same_evaluation(single, scalars(ssft_runs[name]))


@pytest.mark.slow
def test_gfpo_ddp_and_fsdp2_step_like_one_process(ssft_runs, tmp_path):
    """Greedy rollouts after every tag (stratified), so the rollouts do not depend on the per-rank
    sampling seeds: then 2 ranks x 2 questions must update exactly like 1 process x 4."""
    overrides = [f"--model.init_args.init_from={ssft_runs['single'] / 'export'}", "--model.init_args.tag_sampling=stratified",
                 "--model.init_args.group_size=6", "--model.init_args.rollout_temperature=0",
                 "--model.init_args.max_completion_tokens=6", "--model.init_args.kl_coef=0.1"]
    runs = {name: fit("gfpo.yaml", tmp_path / name, *overrides, strategy=strategy, max_steps=2) / "gfpo" / "version_0"
            for name, strategy in (("single", None), ("ddp", "ddp"), ("fsdp2", "fsdp2"))}
    single = scalars(runs["single"])
    assert len(single["train/loss"]) == 2 and any(abs(loss) > 1e-4 for loss in single["train/loss"])
    reference = exported_weights(runs["single"] / "export")
    start = exported_weights(ssft_runs["single"] / "export")
    assert (reference["lm_head.weight"] - start["lm_head.weight"]).abs().max() > 1e-3  # the fork rows moved
    for name in ("ddp", "fsdp2"):
        other = scalars(runs[name])
        assert other["train/loss"] == pytest.approx(single["train/loss"], **LOSS_TOLERANCE), name
        assert_same_weights(reference, exported_weights(runs[name] / "export"), WEIGHT_TOLERANCE)
        assert_same_evaluation(single, other)
