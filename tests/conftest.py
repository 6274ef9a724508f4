"""Shared fixtures: a tiny model and toy data that shrink the shipped configs for fast CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"

TINY_MODEL_CONFIG = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 256,
    "tie_word_embeddings": False,
}


def tiny_overrides(tmp_path: Path, max_steps: int = 2) -> list[str]:
    """CLI overrides that make any toy config run in seconds inside ``tmp_path``."""
    return [
        f"--trainer.max_steps={max_steps}",
        f"--trainer.val_check_interval={max_steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.precision=32-true",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.init_args.model_config={json.dumps(TINY_MODEL_CONFIG)}",
        "--model.init_args.max_new_tokens=12",
        "--data.init_args.toy.num_train=64",
        "--data.init_args.toy.num_val=4",
        "--data.init_args.toy.num_test=4",
        "--data.init_args.batch_size=4",
    ]


@pytest.fixture
def tiny_ssft(tmp_path):
    """An SSFTModule with a tiny fresh model on the toy tokenizer."""
    from forklight.modules.ssft import SSFTModule

    def make(**kwargs):
        module = SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", **kwargs)
        module.configure_model()
        return module

    return make


def tiny_export(tmp_path: Path, model_config: dict | None = None, name: str = "export") -> Path:
    """A tiny fresh SSFT model (3 fork tokens) exported as forklight would, once per ``tmp_path/name``."""
    from forklight.callbacks.export import export_pretrained
    from forklight.modules.ssft import SSFTModule

    directory = tmp_path / name
    if not directory.exists():
        module = SSFTModule(model_config=dict(model_config or TINY_MODEL_CONFIG), tokenizer="toy", num_fork_tokens=3)
        module.configure_model()
        export_pretrained(module, str(directory))
    return directory
