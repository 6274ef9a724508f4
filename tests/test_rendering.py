"""Rendering, masks and the DataModule: prompt and tag masked, trace and end-of-turn supervised."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from forklight.data.datamodule import ForkDataModule, ToyTask
from forklight.data.records import QuestionRecord, RecordError, Trace
from forklight.data.rendering import IGNORE_INDEX, assemble_rows, load_tokenizer, render_prompt_ids, render_trace_ids


def test_rows_mask_prompt_and_tag_and_supervise_trace_and_end():
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([5, 6])]
    traces = [torch.tensor([20, 21, 99]), torch.tensor([30, 99])]  # 99 = end-of-turn
    rows = assemble_rows(prompts, [80, 81], traces, pad_id=0)
    assert rows.input_ids.tolist() == [[5, 6, 7, 80, 20, 21, 99], [5, 6, 81, 30, 99, 0, 0]]
    m = IGNORE_INDEX
    assert rows.labels.tolist() == [[m, m, m, m, 20, 21, 99], [m, m, m, 30, 99, m, m]]


def test_training_sequence_is_prompt_then_tag_then_trace_tokens():
    tokenizer = load_tokenizer("toy")
    tokenizer.add_tokens(["<think1>"], special_tokens=True)
    record = QuestionRecord(id="q", prompt="12+34", messages=None, answer="46", traces=[Trace("so 46")])
    prompt = render_prompt_ids(tokenizer, record)
    trace = render_trace_ids(tokenizer, "so 46", tokenizer.eos_token_id)
    tag = tokenizer.convert_tokens_to_ids("<think1>")
    whole = tokenizer("<|user|>12+34<|end|><|assistant|><think1>so 46<|end|>", add_special_tokens=False)["input_ids"]
    assert prompt + [tag] + trace == whole
    with_system = render_prompt_ids(tokenizer, record, system_prompt="add")
    assert tokenizer.decode(with_system) == "<|system|>add<|end|><|user|>12+34<|end|><|assistant|>"
    templated = render_prompt_ids(tokenizer, record, prompt_template="Q: {prompt} A:")
    assert tokenizer.decode(templated) == "Q: 12+34 A:"


def test_toy_datamodule_batches_whole_questions():
    data = ForkDataModule(toy=ToyTask(num_train=40, num_val=4, num_test=4), batch_size=4, max_traces=3)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert len(batch) == 4 and all(len(traces) == 3 for traces in batch.trace_ids)  # 4 traces sampled to 3
    assert all(set(sources) <= {"column", "running", "split", "direct"} for sources in batch.sources)
    assert all(trace[-1].item() == data.tokenizer.eos_token_id for traces in batch.trace_ids for trace in traces)
    val = next(iter(data.val_dataloader()))
    assert len(val) == 4 and len(val.trace_ids[0]) == 4  # evaluation keeps every trace


def test_file_data_with_seeded_split_truncation_and_skips(tmp_path, caplog):
    path = tmp_path / "train.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+1", "answer": str(i + 1), "traces": [f"so {i + 1}", "x" * 80]} for i in range(10)]
    lines = [json.dumps(r) for r in rows] + ['{"id": "bad", "prompt": 3, "traces": ["a"]}']
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordError, match=r"train\.jsonl:11: .*'prompt'"):
        ForkDataModule(train=str(path), max_length=40).setup("fit")
    data = ForkDataModule(train=str(path), val_size=2, max_length=40, on_bad_record="skip")
    with caplog.at_level(logging.WARNING):
        data.setup("fit")
    assert len(data.datasets["train"]) == 8 and len(data.datasets["val"]) == 2
    assert "train: 8 traces longer than data.max_length=40 were truncated" in caplog.text
    assert sum(data.validation["train"].skipped.values()) == 1 and "skipped: 1 " in data.validation_summary()
    assert max(len(q.prompt_ids) + 1 + len(t) for q in data.datasets["train"].questions for t in q.trace_ids) <= 40


def test_length_grouped_batches_hold_similar_lengths():
    data = ForkDataModule(toy=ToyTask(num_train=256, num_val=1, num_test=1, max_terms=4), batch_size=8)
    data.setup("fit")
    sampler = data.train_dataloader().sampler
    order = list(sampler)
    assert sorted(order) == list(range(256))
    lengths = [sampler.lengths[i] for i in order]
    spread = [max(lengths[i : i + 8]) - min(lengths[i : i + 8]) for i in range(0, 256, 8)]
    assert sum(spread) / len(spread) < (max(lengths) - min(lengths)) / 2
    sampler.set_epoch(1)
    assert list(sampler) != order


def test_bad_arguments_name_the_config_key():
    with pytest.raises(ValueError, match="data.on_bad_record"):
        ForkDataModule(toy=ToyTask(), on_bad_record="ignore")
    with pytest.raises(ValueError, match="data.train"):
        ForkDataModule()
    with pytest.raises(ValueError, match="data.batch_size"):
        ForkDataModule(toy=ToyTask(), batch_size=0)


def test_predict_file_is_read_alongside_the_toy_task(tmp_path):
    path = tmp_path / "ask.jsonl"
    path.write_text(json.dumps({"id": "p1", "prompt": "12+30", "answer": "42", "traces": ["so 42"]}) + "\n")
    data = ForkDataModule(toy=ToyTask(num_train=8, num_val=1, num_test=1), predict=str(path))
    data.setup("predict")
    batch = next(iter(data.predict_dataloader()))
    assert batch.ids == ["p1"] and batch.answers == ["42"]
