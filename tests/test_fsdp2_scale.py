"""FSDP2 at scale (issue 20): meta-device construction, mixed precision options, sharded checkpoints, streamed export.

The fast tests run in one process: the skeleton's parameters are on the meta device and its buffers real; the
streamed fork-token rows equal a whole build's bit for bit; the strategy's options become ``fully_shard`` policies
and mixed precision refuses a trainer precision that casts too; a sharded (DCP) checkpoint directory is a starting
point, and one of another model or of a LoRA run is refused saying why; the streamed export equals
``save_pretrained``'s. The slow ones run two processes (gloo): a meta-initialised model's shards hold exactly the
whole build's weights (and its rotary buffers); FSDP2 mixed precision computes in bfloat16 over float32 masters,
gradients and AdamW moments; a meta-initialised FSDP2 run steps like one process (losses within 1e-5); a resume under
meta_init never reads the starting weights; the streamed export equals the consolidated sharded checkpoint bit for
bit; GFPO starts from that SSFT run's sharded checkpoint directory and steps as from its export; GRPO's sharded
frozen reference equals the policy at the first step (KL 0); one process and FSDP2 test that checkpoint as one
process tests the export; ``fit`` refuses to resume it without a sharded strategy, saying what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_MODEL_CONFIG
from tests.test_distributed import LOSS_TOLERANCE, METRIC_TOLERANCE, WEIGHT_TOLERANCE, assert_same_weights, exported_weights, fit, scalars


def plain_checkpoint(directory: Path, tied: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A fresh tiny Llama saved as a plain Hugging Face checkpoint with the toy tokenizer, no fork tokens (a run
    adds them: new rows), as a pretrained model on the hub is."""
    from forklight.data.rendering import load_tokenizer
    from forklight.models import build_causal_lm

    if not directory.exists():
        tokenizer = load_tokenizer("toy", False)
        config = {**TINY_MODEL_CONFIG, "tie_word_embeddings": tied}
        torch.manual_seed(1)
        model = build_causal_lm(None, config, tokenizer, None, False).to(dtype)
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return directory


def ssft(directory: Path, **kwargs):
    from forklight.modules.ssft import SSFTModule

    return SSFTModule(name_or_path=str(directory), num_fork_tokens=3, **kwargs)


# ---- one process ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_the_skeleton_has_meta_parameters_in_the_whole_builds_dtypes_and_its_real_buffers(tmp_path, dtype):
    directory = plain_checkpoint(tmp_path / "plain", dtype=torch.bfloat16)
    module = ssft(directory, dtype=dtype)
    whole, skeleton = module.build_whole_model(), module.build_skeleton()
    assert type(skeleton) is type(whole)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert {n: (p.shape, p.dtype) for n, p in skeleton.named_parameters()} == \
        {n: (p.shape, p.dtype) for n, p in whole.named_parameters()}  # resized for the fork tokens alike
    buffers = dict(whole.named_buffers())
    assert sorted(buffers) == sorted(name for name, _ in skeleton.named_buffers())
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, whole.model.rotary_emb.inv_freq)
    for name, buffer in skeleton.named_buffers():
        assert torch.equal(buffer, buffers[name]), name


@pytest.mark.parametrize(("tied", "dtype"), [(False, None), (True, None), (False, "bfloat16")],
                         ids=["untied", "tied", "fp32-checkpoint-as-bfloat16"])
def test_streamed_fork_rows_equal_a_whole_builds_bit_for_bit(tmp_path, tied, dtype):
    directory = plain_checkpoint(tmp_path / "plain", tied=tied)
    module = ssft(directory, dtype=dtype, fork_init_noise=0.5)
    whole = module.build_whole_model().state_dict()
    skeleton = module.build_skeleton()
    reader = module.starting_weights_reader(skeleton)
    keys = list(whole) if not tied else [key for key in whole if key != "lm_head.weight"]
    streamed = reader.read(keys)
    new_rows = torch.tensor(module._new_fork_token_ids)
    assert len(new_rows) == 3 and whole["model.embed_tokens.weight"].shape[0] == max(module.fork_token_ids) + 1
    for key in keys:
        assert streamed[key].dtype == whole[key].dtype and torch.equal(streamed[key], whole[key]), key
    assert not torch.equal(whole["model.embed_tokens.weight"][new_rows[0]], whole["model.embed_tokens.weight"][new_rows[1]])


def test_fsdp2_strategy_options_become_fully_shard_policies():
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

    from forklight.sharding import FSDP2Strategy, ShardSettings, shard_settings

    settings = FSDP2Strategy(param_dtype="bfloat16", cpu_offload=True, reshard_after_forward=False).shard_settings()
    assert settings.fully_shard_options["mp_policy"] == MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                             reduce_dtype=torch.float32)
    assert isinstance(settings.fully_shard_options["offload_policy"], CPUOffloadPolicy)
    assert settings.fully_shard_options["reshard_after_forward"] is False and settings.meta_init
    assert FSDP2Strategy().shard_settings() == ShardSettings()  # the defaults: fp32, no offload, PyTorch's resharding
    assert FSDP2Strategy(param_dtype="bfloat16").master_dtype == torch.float32
    assert shard_settings(object()) == ShardSettings()  # Lightning's own ModelParallelStrategy: defaults
    with pytest.raises(ValueError, match="param_dtype must be one of"):
        FSDP2Strategy(param_dtype="bf16")


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_fsdp2_mixed_precision_refuses_a_trainer_precision_that_casts_too(precision):
    from lightning.pytorch.plugins.precision import HalfPrecision, MixedPrecision

    from forklight.sharding import FSDP2Strategy

    strategy = FSDP2Strategy(param_dtype="bfloat16")
    strategy.precision_plugin = MixedPrecision("bf16-mixed", "cpu") if precision == "bf16-mixed" else HalfPrecision("bf16-true")
    with pytest.raises(ValueError, match="set --trainer.precision=32-true"):
        strategy.setup_environment()


def _sharded_checkpoint(module, directory: Path) -> Path:
    """``module``'s state as a Lightning sharded checkpoint directory (DCP shards + ``meta.pt``), written by one process."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"state_dict": module.state_dict()}, checkpoint_id=str(directory), no_dist=True)
    torch.save({"hyper_parameters": dict(module.hparams)}, directory / "meta.pt")
    return directory


def test_a_sharded_checkpoint_directory_is_a_starting_point(tmp_path):
    from forklight.modules.gfpo import GFPOModule
    from forklight.starting import resolve_init_from

    start = ssft(plain_checkpoint(tmp_path / "plain"))
    start.configure_model()
    start.tag_coverage.copy_(torch.tensor([1.0, 5.0, 2.0], dtype=torch.float64))
    checkpoint = _sharded_checkpoint(start, tmp_path / "version_0" / "checkpoints" / "last.ckpt")
    resolved = resolve_init_from(str(tmp_path / "version_*" / "checkpoints" / "last.ckpt"))
    assert (resolved.kind, resolved.path) == ("sharded", str(checkpoint))
    assert resolved.identity["name_or_path"] == str(tmp_path / "plain")
    gfpo = GFPOModule(init_from=str(checkpoint), num_fork_tokens=3, group_size=6)
    gfpo.configure_model()
    assert gfpo.default_tag == 1  # the checkpoint's tag coverage
    expected = start.model.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in gfpo.model.state_dict().items())


def test_a_sharded_checkpoint_of_another_model_or_of_a_lora_run_is_refused_saying_why(tmp_path):
    import torch.distributed.checkpoint as dcp

    from forklight.modules.gfpo import GFPOModule

    start = ssft(plain_checkpoint(tmp_path / "plain"))
    start.configure_model()
    state = start.state_dict()
    adapter = "model.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    cases = {  # what the directory holds -> what the refusal says
        "partial": ({key: value for key, value in state.items() if ".layers.1." not in key},
                    r"lacks \d+ of the model's weights \(e\.g\. \['model\.model\.layers\.1\."),
        "lora": ({key.replace("model.", "model.base_model.model.", 1): value for key, value in state.items()}
                 | {adapter: torch.zeros(4, 64)}, "is a checkpoint of a LoRA run; start from its export"),
    }
    for name, (held, refusal) in cases.items():
        directory = tmp_path / name / "last.ckpt"
        dcp.save({"state_dict": held}, checkpoint_id=str(directory), no_dist=True)
        torch.save({"hyper_parameters": dict(start.hparams)}, directory / "meta.pt")
        with pytest.raises(ValueError, match=refusal):
            GFPOModule(init_from=str(directory), num_fork_tokens=3, group_size=6).configure_model()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_streamed_export_equals_save_pretrained_in_shards_and_loads_with_plain_transformers(tmp_path, tied):
    from safetensors import safe_open

    from forklight.callbacks.export import export_pretrained, export_sharded_pretrained

    module = ssft(plain_checkpoint(tmp_path / "plain", tied=tied))
    module.configure_model()
    export_pretrained(module, str(tmp_path / "whole"))
    files = export_sharded_pretrained(module, str(tmp_path / "streamed"), max_shard_size=20_000)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((tmp_path / "streamed" / name).is_file() for name in shards)
    assert not [name for name in os.listdir(files) if name.startswith(".shard-")]
    for name in shards:  # a shard over the limit holds one block (or one tensor) that alone exceeds it
        with safe_open(str(tmp_path / "streamed" / name), "pt") as handle:
            sizes = {key: handle.get_tensor(key).numel() * 4 for key in handle.keys()}
        groups = {".".join(key.split(".")[:3]) if key.startswith("model.layers.") else key for key in sizes}
        assert sum(sizes.values()) <= 20_000 or len(groups) == 1, (name, sizes)
    whole, streamed = exported_weights(tmp_path / "whole"), exported_weights(tmp_path / "streamed")
    assert sorted(whole) == sorted(streamed) and all(torch.equal(whole[key], streamed[key]) for key in whole)
    assert ("lm_head.weight" in index["weight_map"]) is not tied  # a tied head is written once, as save_pretrained does
    for name in ("config.json", "forklight.json", "tokenizer.json", "generation_config.json"):
        assert (tmp_path / "streamed" / name).is_file(), name
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


# ---- two processes -------------------------------------------------------------------------
def _fill_worker(rank: int, directory: str, port: int, output: str, kind: str) -> None:
    """One of 2 ranks: build the skeleton, shard it, fill it from rank 0 (``kind``: ``safetensors``) or from each
    rank's slices of a sharded checkpoint (``sharded``), then save the full weights and buffers (rank 0)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from forklight.modules.ssft import SSFTModule
    from forklight.sharded_weights import fill_from_rank0, load_sharded_checkpoint, materialize_shards
    from forklight.sharding import fully_shard_model

    # Not destroyed at the end: destroy_process_group then exit aborted 1 run in ~12 here ("terminate called
    # without an active exception", after the work was done); the process exiting tears it down.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    module = SSFTModule(name_or_path=directory, num_fork_tokens=3, dtype="bfloat16") if kind == "safetensors" \
        else SSFTModule(init_from=directory, num_fork_tokens=3)
    skeleton = module.build_skeleton()
    skeleton.float()  # float32 master shards, as keep_master_weights makes them
    fully_shard_model(skeleton, init_device_mesh("cpu", (2,)))
    materialize_shards(skeleton, torch.device("cpu"))
    local = [p.to_local().numel() for p in skeleton.parameters()]
    if kind == "safetensors":
        fill_from_rank0(skeleton, lambda: module.starting_weights_reader(skeleton), "test")
    else:
        load_sharded_checkpoint(skeleton, directory, module._load_dtype, extra={"tag_coverage": module.tag_coverage})
    full = get_model_state_dict(skeleton, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({"state": full, "buffers": dict(skeleton.named_buffers()), "local": local,
                    "coverage": module.tag_coverage}, output)
    dist.barrier()


def _mixed_precision_worker(rank: int, port: int, output: str) -> None:
    """One of 2 ranks: bfloat16 weights as loaded, float32 masters, FSDP2Strategy(param_dtype=bfloat16)'s policy; one
    forward, backward and AdamW step; rank 0 saves the dtypes it saw."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from forklight.data.rendering import load_tokenizer
    from forklight.models import build_causal_lm
    from forklight.sharding import FSDP2Strategy, fully_shard_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = build_causal_lm(None, TINY_MODEL_CONFIG, load_tokenizer("toy", False), "bfloat16", False).float()
    options = FSDP2Strategy(param_dtype="bfloat16").shard_settings().fully_shard_options
    fully_shard_model(model, init_device_mesh("cpu", (2,)), options=options)
    seen = {}
    projection = model.model.layers[0].self_attn.q_proj
    projection.register_forward_pre_hook(lambda module, inputs: seen.update(weight=module.weight.dtype, input=inputs[0].dtype))
    ids = torch.randint(0, 40, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    optimizer.step()
    if rank == 0:
        torch.save({"compute": [str(seen["weight"]), str(seen["input"])],
                    "masters": sorted({str(p.dtype) for p in model.parameters()}),
                    "gradients": sorted({str(p.grad.dtype) for p in model.parameters()}),
                    "moments": sorted({str(state[name].dtype) for state in optimizer.state.values()
                                       for name in ("exp_avg", "exp_avg_sq")})}, output)
    dist.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # a free port for the two ranks' rendezvous
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _filled(tmp_path: Path, directory: Path, kind: str) -> dict:
    import torch.multiprocessing as mp

    output = tmp_path / f"filled-{kind}-{directory.name}.pt"
    mp.spawn(_fill_worker, args=(str(directory), _free_port(), str(output), kind), nprocs=2)
    return torch.load(output, weights_only=True)


@pytest.mark.slow
def test_meta_initialised_shards_hold_exactly_the_whole_builds_weights_and_buffers(tmp_path):
    for tied in (False, True):
        directory = plain_checkpoint(tmp_path / f"plain-tied-{tied}", tied=tied)
        filled = _filled(tmp_path, directory, "safetensors")
        whole = ssft(directory, dtype="bfloat16").build_whole_model().float()  # bfloat16 as loaded, then fp32 masters
        expected = whole.state_dict()
        assert sorted(filled["state"]) == sorted(expected)
        for key, value in expected.items():
            assert value.dtype == filled["state"][key].dtype and torch.equal(value, filled["state"][key]), (tied, key)
        assert sum(filled["local"]) <= sum(p.numel() for p in whole.parameters()) // 2 + 64  # rank 0 holds its half
        for name, buffer in whole.named_buffers():  # rotary inv_freq: rebuilt, not left uninitialised by to_empty
            assert torch.equal(filled["buffers"][name], buffer), name
        assert torch.equal(filled["buffers"]["model.rotary_emb.inv_freq"], whole.model.rotary_emb.inv_freq)

    start = ssft(directory)
    start.configure_model()
    start.tag_coverage.copy_(torch.tensor([0.0, 2.0, 7.0], dtype=torch.float64))
    checkpoint = _sharded_checkpoint(start, tmp_path / "sharded")
    from_checkpoint = _filled(tmp_path, checkpoint, "sharded")  # each rank reads its own slices
    for key, value in start.model.state_dict().items():
        assert torch.equal(from_checkpoint["state"][key], value.float()), key
    assert from_checkpoint["coverage"].tolist() == [0.0, 2.0, 7.0]


@pytest.mark.slow
def test_fsdp2_mixed_precision_computes_in_bfloat16_over_float32_masters_gradients_and_moments(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_mixed_precision_worker, args=(_free_port(), str(tmp_path / "dtypes.pt")), nprocs=2)
    seen = torch.load(tmp_path / "dtypes.pt", weights_only=True)
    assert seen["compute"] == ["torch.bfloat16", "torch.bfloat16"]  # gathered weights and activations
    assert seen["masters"] == seen["gradients"] == seen["moments"] == ["torch.float32"]


def from_plain_checkpoint(directory: Path) -> list[str]:
    return [f"--model.init_args.name_or_path={directory}", "--model.init_args.tokenizer=null",
            "--model.init_args.model_config=null", "--model.init_args.num_fork_tokens=3",
            "--model.init_args.learning_rate=1e-4", "--model.init_args.loss_head=full"]


@pytest.fixture(scope="module")
def scale_runs(tmp_path_factory):
    """SSFT from a plain Hugging Face checkpoint (new fork-token rows): one process (batch 4) and FSDP2 with meta_init
    (2 x 2), which also writes a second export in shards of at most 20 kB."""
    tmp = tmp_path_factory.mktemp("scale")
    directory = plain_checkpoint(tmp / "plain")
    sharded_export = tmp / "small_shards.yaml"
    sharded_export.write_text("trainer:\n  callbacks+:\n    - class_path: forklight.callbacks.HFExport\n"
                              f"      init_args: {{dirpath: {tmp / 'export_in_shards'}, max_shard_size: 20000}}\n")
    start = from_plain_checkpoint(directory)
    runs = {"single": fit("ssft.yaml", tmp / "single", *start),
            "fsdp2": fit("ssft.yaml", tmp / "fsdp2", *start, "-c", str(sharded_export), strategy="fsdp2")}
    runs = {name: root / "ssft" / "version_0" for name, root in runs.items()}
    runs["export_in_shards"] = tmp / "export_in_shards"
    return runs


@pytest.mark.slow
def test_a_meta_initialised_fsdp2_run_steps_like_one_process(scale_runs):
    single, sharded = scalars(scale_runs["single"])["train/loss"], scalars(scale_runs["fsdp2"])["train/loss"]
    assert len(single) == 3 and sharded == pytest.approx(single, **LOSS_TOLERANCE)
    assert_same_weights(exported_weights(scale_runs["single"] / "export"), exported_weights(scale_runs["fsdp2"] / "export"),
                        WEIGHT_TOLERANCE)


@pytest.mark.slow
def test_a_meta_initialised_resume_leaves_the_shards_to_the_checkpoint(scale_runs, tmp_path):
    """``--ckpt_path`` under meta_init: the shards are filled by the checkpoint Lightning restores, the starting
    weights are never read (at 32B, minutes): with its weights file cut after the header, the run still resumes and
    takes the step the uninterrupted run took."""
    directory = plain_checkpoint(tmp_path / "plain")
    first = fit("ssft.yaml", tmp_path / "first", *from_plain_checkpoint(directory), strategy="fsdp2", max_steps=2)
    weights = directory / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")
    with open(weights, "r+b") as handle:
        handle.truncate(header)  # a reader of the starting weights now fails
    checkpoint = first / "ssft" / "version_0" / "checkpoints" / "last.ckpt"
    resumed = fit("ssft.yaml", tmp_path / "resumed", *from_plain_checkpoint(directory), f"--ckpt_path={checkpoint}",
                  strategy="fsdp2", max_steps=3)
    losses = scalars(resumed / "ssft" / "version_0")["train/loss"]
    assert losses == pytest.approx(scalars(scale_runs["fsdp2"])["train/loss"][2:], **LOSS_TOLERANCE)


@pytest.mark.slow
def test_the_streamed_export_is_the_consolidated_sharded_checkpoint_bit_for_bit(scale_runs, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    sharded = scale_runs["fsdp2"] / "checkpoints" / "last.ckpt"
    assert sharded.is_dir() and (sharded / "meta.pt").is_file()
    dcp_to_torch_save(sharded, tmp_path / "consolidated.pt")
    checkpoint = torch.load(tmp_path / "consolidated.pt", weights_only=True)["state_dict"]
    consolidated = {key[len("model."):]: value for key, value in checkpoint.items() if key.startswith("model.")}
    index = json.loads((scale_runs["export_in_shards"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2  # streamed into several files
    for export in (scale_runs["fsdp2"] / "export", scale_runs["export_in_shards"]):
        exported = exported_weights(export)  # plain transformers
        assert sorted(exported) == sorted(consolidated)
        assert all(torch.equal(exported[key], consolidated[key]) for key in exported), export


@pytest.mark.slow
def test_gfpo_starts_from_the_ssft_runs_sharded_checkpoint_as_from_its_export(scale_runs, tmp_path):
    """Greedy rollouts after every tag and an exact KL to the start (its tag policy spread over the ranks): from the
    SSFT run's own sharded checkpoint directory (each rank reads its slices) and from its export (rank 0 streams it),
    under FSDP2, and from the checkpoint in one process (read whole), the same steps."""
    run = scale_runs["fsdp2"]
    common = ["--model.init_args.tag_sampling=stratified", "--model.init_args.group_size=6",
              "--model.init_args.rollout_temperature=0", "--model.init_args.max_completion_tokens=6",
              "--model.init_args.kl_coef=0.1", "--model.init_args.num_fork_tokens=3"]
    checkpoint = f"--model.init_args.init_from={run / 'checkpoints' / 'last.ckpt'}"
    runs = {"checkpoint_fsdp2": fit("gfpo.yaml", tmp_path / "a", checkpoint, *common, strategy="fsdp2", max_steps=2),
            "export_fsdp2": fit("gfpo.yaml", tmp_path / "b", f"--model.init_args.init_from={run / 'export'}", *common,
                                strategy="fsdp2", max_steps=2),
            "checkpoint_single": fit("gfpo.yaml", tmp_path / "c", checkpoint, *common, max_steps=2)}
    losses = {name: scalars(root / "gfpo" / "version_0")["train/loss"] for name, root in runs.items()}
    assert len(losses["export_fsdp2"]) == 2 and any(abs(loss) > 1e-4 for loss in losses["export_fsdp2"])
    for name in ("checkpoint_fsdp2", "checkpoint_single"):
        assert losses[name] == pytest.approx(losses["export_fsdp2"], **LOSS_TOLERANCE), name
    metadata = [json.loads((root / "gfpo" / "version_0" / "export" / "forklight.json").read_text()) for root in runs.values()]
    assert len({entry["default_tag"] for entry in metadata}) == 1  # the SSFT run's tag coverage carried over


@pytest.mark.slow
def test_grpos_sharded_reference_is_the_starting_policy(scale_runs, tmp_path):
    """The frozen reference is built and filled like the policy: at the first step their token log-probs agree, so
    the KL term is 0 (a reference left with uninitialised shards would give a huge or NaN KL)."""
    root = fit("grpo.yaml", tmp_path / "grpo", f"--model.init_args.init_from={scale_runs['fsdp2'] / 'export'}",
               "--model.init_args.num_fork_tokens=3", "--model.init_args.kl_coef=0.5", "--model.init_args.group_size=2",
               "--model.init_args.max_completion_tokens=6", strategy="fsdp2", max_steps=1)
    kl = scalars(root / "grpo" / "version_0")["train/kl"]
    assert len(kl) == 1 and abs(kl[0]) < 1e-6


def test_fit_refuses_to_resume_a_sharded_checkpoint_without_a_sharded_strategy(tmp_path):
    from forklight.cli import main
    from forklight.errors import ConfigError
    from tests.conftest import CONFIGS, tiny_overrides

    (tmp_path / "last.ckpt").mkdir()
    with pytest.raises(ConfigError, match="configs/strategies/fsdp2.yaml.*init_from="):
        main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), f"--ckpt_path={tmp_path / 'last.ckpt'}"])


@pytest.mark.slow
def test_one_process_tests_a_sharded_checkpoint_as_its_export(scale_runs, tmp_path):
    """``forklight test --ckpt_path <sharded dir>`` on one device reads the weights whole: the same results as the
    run's export."""
    from forklight.cli import main
    from tests.conftest import CONFIGS, tiny_overrides

    run = scale_runs["fsdp2"]
    common = ["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--model.init_args.tokenizer=null",
              "--model.init_args.model_config=null", "--model.init_args.num_fork_tokens=3"]
    main(["test", *common, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
          f"--model.init_args.eval_output={tmp_path / 'from_checkpoint'}"])
    main(["test", *common, f"--model.init_args.init_from={run / 'export'}",
          f"--model.init_args.eval_output={tmp_path / 'from_export'}"])
    results = [json.loads((tmp_path / name / "results.json").read_text())["metrics"] for name in ("from_checkpoint", "from_export")]
    assert results[0] and results[0] == results[1]


@pytest.mark.slow
def test_fsdp2_tests_its_sharded_checkpoint_as_one_process_tests_the_export(scale_runs, tmp_path):
    """``forklight test --ckpt_path <sharded dir>`` under FSDP2 (meta_init: the shards are left to the checkpoint
    Lightning restores, each rank reading its slices): the metrics one process gets from the run's export."""
    import subprocess
    import sys

    from forklight.cli import main
    from tests.conftest import CONFIGS, REPO, tiny_overrides

    run = scale_runs["fsdp2"]
    common = ["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--model.init_args.tokenizer=null",
              "--model.init_args.model_config=null", "--model.init_args.num_fork_tokens=3"]
    command = [sys.executable, "-m", "forklight", "test", *common, "-c", str(CONFIGS / "strategies" / "fsdp2.yaml"),
               f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "--data.init_args.batch_size=2",
               f"--model.init_args.eval_output={tmp_path / 'sharded'}"]
    result = subprocess.run(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    main(["test", *common, f"--model.init_args.init_from={run / 'export'}",
          f"--model.init_args.eval_output={tmp_path / 'export'}"])
    sharded, export = (json.loads((tmp_path / name / "results.json").read_text())["metrics"] for name in ("sharded", "export"))
    assert export and sorted(sharded) == sorted(export)
    assert all(sharded[key] == pytest.approx(export[key], abs=METRIC_TOLERANCE) for key in export), (sharded, export)
