"""The models and data the benchmarks run, and forklight's SFT training loop timed step by step.

Two models: the toy GPT of ``configs/ssft.yaml`` (0.8M parameters) and a ~110M-parameter Llama
(hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied embeddings). SFT runs (``vs_trl``,
``mfu``) use the SFT-mixed baseline ``SSFTModule(matching="single", num_fork_tokens=1)``; RL runs
(``rl_update_cost``, ``vs_trl``) start from :func:`starting_point`.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import statistics
import tempfile

from benchmarks.timing import Clock, lightning_step_timer, step_seconds

TOY_MODEL = {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 512, "n_positions": 256,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False}
LLAMA_110M = {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
              "max_position_embeddings": 1024, "tie_word_embeddings": True}
# SFT workloads: questions per step, traces per question, trace length (None = the toy task's own traces)
SFT_MODELS = {"toy": {"model_config": TOY_MODEL, "questions": 4, "traces": 4, "trace_length": None},
              "llama-110m": {"model_config": LLAMA_110M, "questions": 1, "traces": 4, "trace_length": 512}}
TOY_CHARACTERS = "0123456789+-=*/.,:;()?!'\" _abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def model_spec(name: str, trace_length: int | None, questions: int | None) -> dict:
    """``SFT_MODELS[name]`` with the command line's trace length (not for the toy task's own traces)
    and questions per step, where given."""
    spec = dict(SFT_MODELS[name])
    if name != "toy" and trace_length is not None:
        spec["trace_length"] = trace_length
    if questions is not None:
        spec["questions"] = questions
    return spec


def starting_point(init_from: str | None) -> str:
    """An export to start RL from: the given one, the newest toy SSFT export, or a fresh toy model."""
    if init_from:
        return init_from
    found = sorted(glob.glob("runs/ssft/version_*/export"), key=lambda path: int(re.search(r"version_(\d+)", path)[1]))
    if found:
        return found[-1]
    from forklight.callbacks.export import export_pretrained
    from forklight.modules.ssft import SSFTModule

    module = SSFTModule(model_config=TOY_MODEL, tokenizer="toy")
    module.configure_model()
    return export_pretrained(module, tempfile.mkdtemp(prefix="forklight-bench-"))


# ---- SFT-mixed -----------------------------------------------------------------------------------
def sft_datamodule(spec: dict, steps: int, seed: int):
    """A ForkDataModule with enough questions for ``steps`` batches: the toy task, or (``trace_length``)
    random toy-character traces after toy prompts, written to a temporary jsonl file."""
    from forklight.data.datamodule import ForkDataModule, ToyTask
    from forklight.data.toy import generate_toy_records

    questions = spec["questions"] * (steps + 2)
    common = {"tokenizer": "toy", "num_fork_tokens": 1, "max_traces": spec["traces"],
              "batch_size": spec["questions"], "seed": seed}
    if spec["trace_length"] is None:
        return ForkDataModule(toy=ToyTask(num_train=questions, num_val=0, num_test=0), max_length=256, **common)
    rng = random.Random(seed)
    path = os.path.join(tempfile.mkdtemp(prefix="forklight-vs-trl-"), "train.jsonl")
    with open(path, "w") as handle:
        for record in generate_toy_records(questions, seed=seed):
            traces = ["".join(rng.choice(TOY_CHARACTERS) for _ in range(spec["trace_length"] - 1))
                      for _ in range(spec["traces"])]  # + the end-of-turn token = trace_length tokens
            handle.write(json.dumps({"id": record.id, "prompt": record.prompt, "answer": record.answer,
                                     "traces": traces}) + "\n")
    return ForkDataModule(train=path, max_length=spec["trace_length"] + 64, **common)


def sft_module(spec: dict, learning_rate: float):
    from forklight.modules.ssft import SSFTModule

    return SSFTModule(matching="single", num_fork_tokens=1, model_config=spec["model_config"], tokenizer="toy",
                      learning_rate=learning_rate, seed=0)


def planned_rows(datamodule, steps: int, tag_id: int) -> tuple[list[dict], list[list[str]], list[int]]:
    """The rows of forklight's first ``steps`` training batches, in order, as TRL pre-tokenised examples
    (``input_ids``, ``labels`` with -100 on prompt and tag); also each batch's question ids and supervised tokens."""
    from itertools import islice

    rows, batch_ids, supervised = [], [], []
    for batch in islice(iter(datamodule.train_dataloader()), steps):
        batch_ids.append(list(batch.ids))
        supervised.append(sum(len(trace) for traces in batch.trace_ids for trace in traces))
        for prompt, traces in zip(batch.prompt_ids, batch.trace_ids):
            for trace in traces:
                prefix = prompt.tolist() + [tag_id]
                rows.append({"input_ids": prefix + trace.tolist(), "labels": [-100] * len(prefix) + trace.tolist()})
    return rows, batch_ids, supervised


def throughput(seconds: list[float], tokens: list[int]) -> dict:
    """A run's median step and median per-step supervised tokens/s (robust to a stalled step), and the totals."""
    return {"step_s": statistics.median(seconds),
            "tokens_per_s": statistics.median(t / s for t, s in zip(tokens, seconds, strict=True)),
            "tokens_per_s_total": sum(tokens) / sum(seconds), "step_s_all": seconds, "supervised_tokens": tokens}


def lightning_trainer(steps: int, bf16: bool, timer):
    """A bare Lightning Trainer for ``steps`` optimiser steps: no logger, checkpoints, validation or bars."""
    import lightning as L

    return L.Trainer(accelerator="auto", devices=1, precision="bf16-mixed" if bf16 else "32-true", max_steps=steps,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])


def run_forklight_sft(spec: dict, datamodule, steps: int, warmup_steps: int, bf16: bool, learning_rate: float,
                      clock: Clock) -> dict:
    """One Lightning fit of ``warmup_steps + steps`` SFT-mixed steps; the timed steps' throughput."""
    module = sft_module(spec, learning_rate)
    timer = lightning_step_timer(clock)
    trainer = lightning_trainer(warmup_steps + steps, bf16, timer)
    trainer.fit(module, datamodule=datamodule)
    tokens = timer.supervised[warmup_steps:]
    return {**throughput(step_seconds(timer, warmup_steps), tokens), "batch_ids": timer.batch_ids,
            "parameters": sum(p.numel() for p in module.model.parameters())}
