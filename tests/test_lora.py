"""LoRA and model sources on the tiny toy model (fast): what trains, the merged export, resuming,
and the errors of bad settings. The real-model versions are in test_real_model.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from forklight.cli import main
from forklight.models import lora_settings
from tests.conftest import CONFIGS, tiny_overrides


def test_lora_trains_adapters_and_fork_rows_only(tiny_ssft):
    module = tiny_ssft(lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    trainable = sorted(name for name, p in module.named_parameters() if p.requires_grad)
    assert trainable and all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)
    # untied toy model: the fork rows of both the input embedding and the output layer train
    assert sum("trainable_tokens_delta" in name for name in trainable) == 2
    embeddings = module.model.get_input_embeddings()
    assert embeddings.token_adapter.token_indices["default"] == module.fork_token_ids


def test_lora_run_exports_merged_weights_and_resumes(tmp_path: Path):
    args = ["-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path, max_steps=3),
            "--model.init_args.lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"]
    main(["fit", *args])
    run = tmp_path / "ssft" / "version_0"
    from safetensors.torch import load_file

    weights = load_file(str(run / "export" / "model.safetensors"))
    assert not any("lora" in key or "base_layer" in key for key in weights)
    metadata = json.loads((run / "export" / "forklight.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run / "export"))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.get_input_embeddings().weight.shape[0] > max(metadata["fork_token_ids"])
    # the checkpoint keeps the adapters: test and a resumed fit load it with the same lora settings
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert any("lora_A" in key for key in checkpoint["state_dict"])
    main(["test", *args, f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])
    main(["fit", *args[:-1], *tiny_overrides(tmp_path, max_steps=4)[:1], args[-1],
          f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"])


def test_bad_lora_settings_say_which_key():
    with pytest.raises(ValueError, match=r"model.lora has unknown keys \['rank'\]"):
        lora_settings({"rank": 8})
    with pytest.raises(ValueError, match="model.lora.r must be >= 1"):
        lora_settings({"r": 0})
    with pytest.raises(TypeError, match="model.lora.target_modules has the wrong type"):
        lora_settings({"target_modules": 3})
    assert lora_settings({"r": 4}) == {"r": 4, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"}


def test_gfpo_head_with_lora_is_refused(tiny_ssft, tmp_path: Path):
    from forklight.callbacks.export import export_pretrained
    from forklight.modules.gfpo import GFPOModule

    export = export_pretrained(tiny_ssft(), str(tmp_path / "export"))
    with pytest.raises(ValueError, match="set model.init_args.trainable=all"):
        GFPOModule(init_from=export, lora={"r": 4}, trainable="head")
    GFPOModule(init_from=export, lora={"r": 4}, trainable="all")


def test_missing_gguf_file_is_named(tmp_path: Path):
    from forklight.modules.ssft import SSFTModule

    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope\.gguf does not exist"):
        SSFTModule(name_or_path=str(tmp_path / "nope.gguf"))
