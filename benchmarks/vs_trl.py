"""forklight vs TRL: SFT-mixed throughput, and a GFPO step against a ``GRPOTrainer`` step.

    pip install trl                                   # optional benchmark dependency
    python benchmarks/vs_trl.py --quick               # toy model only, few steps (~1 minute on 2 CPU cores)
    python benchmarks/vs_trl.py                       # toy + ~110M Llama SFT, and the RL step (~11 min on 2 cores)
    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py --clock cpu         # on a CPU machine others are using too
    python benchmarks/vs_trl.py --bf16 --questions-sft 16 --questions 64     # e.g. on a GPU: bigger batches

Both comparisons run the *whole training loop* of each framework, in this process, on the same
model, data and optimiser, and time each optimiser step from the end of the previous one (data
loading, collation, forward, backward, AdamW, the loop's own bookkeeping):

- **SFT** (``--parts sft``): forklight ``SSFTModule(matching="single", num_fork_tokens=1)`` (the
  SFT-mixed baseline) under a Lightning ``Trainer(max_steps=...)`` against TRL's ``SFTTrainer``.
  Same fresh weights (one model config, one seed; the fork token added to both), the same rows
  ``[prompt | <think1> | trace | end]`` in the same batches and order (TRL gets them pre-tokenised,
  with labels ``-100`` on prompt and tag, so the loss covers exactly the tokens forklight
  supervises; a sequential sampler replays forklight's length-grouped batches), AdamW, no
  gradient clipping, fp32 or (``--bf16``) bf16 autocast over fp32 weights in both. Throughput =
  supervised tokens (trace + end-of-turn) per second; the script checks both saw the same count.
  Models: the toy GPT (0.8M, real toy traces, 4 questions x 4 traces per step, as
  ``configs/ssft.yaml``) and the ~110M Llama of ``benchmarks/ssft_overhead.py`` (random toy-character
  traces of ``--trace-length`` tokens, 1 question x 4 traces per step).
- **RL** (``--parts rl``): one forklight GFPO step (tag policy, ``B*G`` rollouts, rewards, one
  update of the fork-token head) and one forklight GRPO step, under Lightning, against one TRL
  ``GRPOTrainer`` step: the same starting model (``--init-from``; default the newest toy SSFT
  export, else fresh toy weights), the same toy questions in the same order, ``G`` completions of
  at most ``--max-new-tokens`` per question at temperature 1, the same reward (forklight's
  ``exact_integer``: the last integer equals the toy answer), DAPO loss, no KL, one iteration,
  gradient norm clipped at 1. GRPO (both) rolls out after one fixed tag (the model's default tag),
  the paper's SFT+GRPO baseline; GFPO draws each rollout's tag from its policy, so its completions
  can be shorter or longer: completion tokens per step are reported next to the times.

Differences that belong to the frameworks and stay in: TRL's ``SFTTrainer`` passes an attention
mask and runs its fused LM head, which projects only the supervised positions (in tiles) and also
computes entropy and top-1 accuracy for its logs, while forklight feeds right-padded rows without a
mask and computes the logits of every position; under ``--bf16`` Lightning's autocast covers
forklight's whole training step, rollouts included, while TRL generates outside autocast (with
the fp32 weights).

Protocol: each side runs once as a warm-up (discarded), then ``--repeats`` rounds alternate the
sides (so load from other processes hits both alike); each run takes ``--warmup-steps`` untimed
steps and ``--steps`` timed ones, and a run's value is the median of its timed steps; the table
shows the median over runs and the ratio, and also the ratio of each side's fastest step (what it
does when nothing else competes for the machine: the number to read on a shared machine). On a
shared CPU-only machine ``--clock cpu`` times with this process's CPU time instead of wall time,
which other processes' load hardly moves (the generation and update shares then count CPU seconds);
with ``OMP_NUM_THREADS=1``, since busy-waiting OpenMP threads of a starved process burn CPU time too.
Prints the tables and writes the same numbers to ``benchmarks/results/vs_trl.json``. Target: a GFPO step <= 0.5x a TRL GRPO step.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rl_update_cost import TOY_MODEL, starting_point  # noqa: E402  (the RL benchmarks start from the same export)

LLAMA_110M = {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
              "max_position_embeddings": 1024, "tie_word_embeddings": True}
# questions per step, traces per question, trace length (None = the toy task's own traces)
MODELS = {"toy": {"model_config": TOY_MODEL, "questions": 4, "traces": 4, "trace_length": None},
          "llama-110m": {"model_config": LLAMA_110M, "questions": 1, "traces": 4, "trace_length": 512}}
TOY_CHARACTERS = "0123456789+-=*/.,:;()?!'\" _abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def require_trl():
    try:
        import trl
    except ImportError:
        sys.exit("benchmarks/vs_trl.py compares against TRL, an optional benchmark dependency that is not "
                 "installed: pip install trl")
    return trl


def quiet() -> None:
    """Keep the tables readable: no per-run banners, progress bars or library warnings."""
    import lightning  # noqa: F401  (its loggers are configured on import: import first, then quieten)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "forklight", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = [time.perf_counter]


def clock() -> float:
    """The timer of every measurement here: wall time, or (``--clock cpu``) this process's CPU time."""
    return _clock[0]()


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_of_runs(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def fastest_step(runs: list[dict]) -> float:
    """The fastest timed step of all runs: what a side does when nothing else competes for the machine."""
    return min(min(run["step_s_all"]) for run in runs)


def best_throughput(runs: list[dict]) -> float:
    return max(max(t / s for t, s in zip(run["supervised_tokens"], run["step_s_all"])) for run in runs)


# ---- timing the two training loops -------------------------------------------------------------
def lightning_step_timer():
    """Lightning callback: wall time at the end of every training batch (each is one optimiser step)."""
    import lightning as L

    class _Timer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.batch_ids: list[list[str]] = []
            self.supervised: list[int] = []

        def on_train_start(self, trainer, pl_module) -> None:
            synchronize()
            self.start = clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize()
            self.ends.append(clock())
            self.batch_ids.append(list(batch.ids))
            self.supervised.append(sum(len(trace) for traces in batch.trace_ids for trace in traces))

    return _Timer()


def hf_step_timer():
    """transformers ``TrainerCallback``: wall time at the end of every optimiser step."""
    from transformers import TrainerCallback

    class _Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            synchronize()
            self.start = clock()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            synchronize()
            self.ends.append(clock())

    return _Timer()


def step_seconds(timer, warmup_steps: int) -> list[float]:
    """Seconds of each optimiser step after the first ``warmup_steps`` (end of step k-1 to end of step k)."""
    ends = [timer.start] + timer.ends
    return [b - a for a, b in zip(ends, ends[1:])][warmup_steps:]


def lightning_trainer(steps: int, bf16: bool, timer):
    import lightning as L

    return L.Trainer(accelerator="auto", devices=1, precision="bf16-mixed" if bf16 else "32-true", max_steps=steps,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer])


def alternate(sides: dict, repeats: int, warmup_runs: int = 1) -> dict[str, list[dict]]:
    """Run every side ``warmup_runs`` times (discarded), then ``repeats`` rounds alternating them."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(warmup_runs + repeats):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))  # who goes first alternates too
        for name in order:
            result = sides[name](warmup=round_index < warmup_runs)
            release()
            if round_index >= warmup_runs:
                runs[name].append(result)
                print(f"    {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)),
                      flush=True)
    return runs


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


def run_forklight_sft(spec: dict, datamodule, steps: int, warmup_steps: int, bf16: bool, learning_rate: float) -> dict:
    module = sft_module(spec, learning_rate)
    timer = lightning_step_timer()
    trainer = lightning_trainer(warmup_steps + steps, bf16, timer)
    trainer.fit(module, datamodule=datamodule)
    tokens = timer.supervised[warmup_steps:]
    return {**throughput(step_seconds(timer, warmup_steps), tokens), "batch_ids": timer.batch_ids,
            "parameters": sum(p.numel() for p in module.model.parameters())}


def run_trl_sft(spec: dict, rows: list[dict], rows_per_step: int, steps: int, warmup_steps: int, bf16: bool,
                learning_rate: float) -> dict:
    from datasets import Dataset
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    module = sft_module(spec, learning_rate)
    module.configure_model()  # the same fresh weights (config + seed) and fork-token row as the forklight side
    total = warmup_steps + steps
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="forklight-vs-trl-"), per_device_train_batch_size=rows_per_step,
        max_steps=total, learning_rate=learning_rate, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        bf16=bf16, use_cpu=not torch.cuda.is_available(), max_length=None, train_sampling_strategy="sequential",
        dataloader_num_workers=0, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    timer = hf_step_timer()
    trainer = SFTTrainer(model=module.model, args=args, train_dataset=Dataset.from_list(rows[: rows_per_step * total]),
                         processing_class=module.tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line
    supervised: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        supervised.append(int((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    trainer.train()
    return throughput(step_seconds(timer, warmup_steps), supervised[warmup_steps:total])


def model_spec(name: str, trace_length: int | None, questions: int | None) -> dict:
    """``MODELS[name]`` with the command line's trace length (not for the toy task's own traces)
    and questions per step, where given."""
    spec = dict(MODELS[name])
    if name != "toy" and trace_length is not None:
        spec["trace_length"] = trace_length
    if questions is not None:
        spec["questions"] = questions
    return spec


def compare_sft(name: str, args) -> dict:
    spec = model_spec(name, args.trace_length, args.questions_sft)
    total = args.warmup_steps + args.steps
    datamodule = sft_datamodule(spec, total, seed=1)
    datamodule.setup("fit")
    tag_id = sft_module(spec, args.learning_rate).fork_token_ids[0]
    rows, batch_ids, supervised = planned_rows(datamodule, total, tag_id)
    rows_per_step = spec["questions"] * spec["traces"]
    assert len(rows) == rows_per_step * total, "every toy question has the same number of traces"
    print(f"  SFT {name}: {rows_per_step} rows/step, ~{statistics.mean(supervised):.0f} supervised tokens/step, "
          f"{'bf16-mixed' if args.bf16 else 'fp32'}", flush=True)

    def forklight_side(warmup: bool) -> dict:
        result = run_forklight_sft(spec, datamodule, 1 if warmup else args.steps, args.warmup_steps, args.bf16,
                                   args.learning_rate)
        expected = batch_ids[args.warmup_steps : args.warmup_steps + len(result["supervised_tokens"])]
        assert result.pop("batch_ids")[args.warmup_steps :] == expected, "forklight trained other batches than planned"
        return result

    def trl_side(warmup: bool) -> dict:
        result = run_trl_sft(spec, rows, rows_per_step, 1 if warmup else args.steps, args.warmup_steps, args.bf16,
                             args.learning_rate)
        expected = supervised[args.warmup_steps : args.warmup_steps + len(result["supervised_tokens"])]
        assert result["supervised_tokens"] == expected, (result["supervised_tokens"], expected)
        return result

    runs = alternate({"forklight": forklight_side, "trl": trl_side}, args.repeats)
    parameters = [run.pop("parameters") for run in runs["forklight"]][0]
    forklight_tps = median_of_runs(runs["forklight"], "tokens_per_s")
    trl_tps = median_of_runs(runs["trl"], "tokens_per_s")
    return {"model": name, "parameters": parameters, "precision": "bf16-mixed" if args.bf16 else "fp32",
            "questions_per_step": spec["questions"], "rows_per_step": rows_per_step,
            "trace_length": spec["trace_length"], "supervised_tokens_per_step": statistics.mean(supervised),
            "forklight_step_s": median_of_runs(runs["forklight"], "step_s"),
            "trl_step_s": median_of_runs(runs["trl"], "step_s"),
            "forklight_tokens_per_s": forklight_tps, "trl_tokens_per_s": trl_tps, "speedup": forklight_tps / trl_tps,
            "speedup_best": best_throughput(runs["forklight"]) / best_throughput(runs["trl"]),
            "runs": runs}


# ---- RL: GFPO / GRPO step vs TRL GRPOTrainer ------------------------------------------------------
def rl_datamodule(start: str, questions: int, steps: int):
    from forklight.data.datamodule import ForkDataModule, ToyTask

    datamodule = ForkDataModule(toy=ToyTask(num_train=questions * (steps + 2), num_val=0, num_test=0), tokenizer=start,
                                batch_size=questions, max_length=256, seed=1)
    datamodule.setup("fit")
    return datamodule


def rl_common(args, start: str) -> dict:
    from forklight.starting import resolve_init_from

    return {"init_from": start, "num_fork_tokens": resolve_init_from(start)["identity"].get("num_fork_tokens", 6),
            "group_size": args.group_size, "max_completion_tokens": args.max_new_tokens, "rollout_temperature": 1.0,
            "rollout_top_p": 1.0, "num_iterations": 1, "clip_eps": 0.2, "kl_coef": 0.0, "scale_rewards": "group",
            "max_grad_norm": 1.0, "learning_rate": args.learning_rate, "verifier": "exact_integer",
            "generation_batch_size": args.questions * args.group_size}


def run_forklight_rl(kind: str, common: dict, datamodule, steps: int, warmup_steps: int, bf16: bool) -> dict:
    """One Lightning fit of GFPO (``trainable: head``) or GRPO; per step: seconds, generation seconds, tokens."""
    from forklight.modules.gfpo import GFPOModule
    from forklight.modules.grpo import GRPOModule

    module = GFPOModule(**common, trainable="head") if kind == "gfpo" else GRPOModule(**common, loss_type="dapo")
    generate_s, completion_tokens = [], []
    prepare, rollouts = module.prepare_update, module.rollouts

    def timed_prepare(batch, batch_idx):  # tag policy (GFPO), rollouts, rewards, advantages
        started = clock()
        context = prepare(batch, batch_idx)
        synchronize()
        generate_s.append(clock() - started)
        return context

    def counted_rollouts(batch, tags, batch_idx):
        groups = rollouts(batch, tags, batch_idx)
        completion_tokens.append(sum(c.length for group in groups for c in group.completions))
        return groups

    module.prepare_update, module.rollouts = timed_prepare, counted_rollouts
    timer = lightning_step_timer()
    lightning_trainer(warmup_steps + steps, bf16, timer).fit(module, datamodule=datamodule)
    return rl_result(step_seconds(timer, warmup_steps), generate_s[warmup_steps:], completion_tokens[warmup_steps:])


def rl_result(seconds: list[float], generate_s: list[float], tokens: list[int]) -> dict:
    step, generate = statistics.median(seconds), statistics.median(generate_s)
    return {"step_s": step, "generate_s": generate, "update_s": step - generate, "generate_share": generate / step,
            "completion_tokens": float(statistics.mean(tokens)), "step_s_all": seconds, "generate_s_all": generate_s}


def trl_prompts(start: str, datamodule, questions: int, steps: int) -> tuple[list[dict], int]:
    """forklight's first ``steps`` batches as TRL rows: prompt text (chat template + the default tag) and answer."""
    from itertools import islice

    from transformers import AutoTokenizer

    from forklight.starting import resolve_init_from

    source = resolve_init_from(start)
    if source["kind"] != "export":
        sys.exit(f"--init-from {start}: TRL loads the model with from_pretrained, so give a forklight export dir")
    tokenizer = AutoTokenizer.from_pretrained(source["path"])
    metadata = source["metadata"]
    tag_id = metadata["fork_token_ids"][metadata.get("default_tag_index", 0)]
    rows = []
    for batch in islice(iter(datamodule.train_dataloader()), steps):
        for prompt, answer in zip(batch.prompt_ids, batch.answers):
            ids = prompt.tolist() + [tag_id]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            assert tokenizer(text=[text])["input_ids"][0] == ids, "TRL would tokenise the prompt differently"
            rows.append({"prompt": text, "answer": answer})
    return rows, tag_id


def run_trl_grpo(start: str, rows: list[dict], args, steps: int, warmup_steps: int) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from forklight.rewards import exact_integer

    generate_s, completion_tokens = [], []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):  # generation, rewards, advantages (per optimiser step here)
            started = clock()
            output = super()._generate_and_score_completions(inputs)
            synchronize()
            generate_s.append(clock() - started)
            completion_tokens.append(int(output["completion_mask"].sum()))
            return output

    def toy_reward(prompts, completions, answer, **kwargs):
        return exact_integer(completions, answer)

    total = warmup_steps + steps
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="forklight-vs-trl-"),
        per_device_train_batch_size=args.questions * args.group_size, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, max_steps=total,
        learning_rate=args.learning_rate, beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
        epsilon=0.2, max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0, bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(), shuffle_dataset=False, logging_steps=10**6, save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False, seed=0,
    )
    timer = hf_step_timer()
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    trainer = TimedGRPOTrainer(model=model, reward_funcs=toy_reward, args=config,
                               train_dataset=Dataset.from_list(rows[: args.questions * total]),
                               processing_class=AutoTokenizer.from_pretrained(start), callbacks=[timer])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    seconds = step_seconds(timer, warmup_steps)
    return rl_result(seconds, generate_s[warmup_steps:total], completion_tokens[warmup_steps:total])


def compare_rl(args) -> dict:
    start = starting_point(args.init_from)
    total = args.warmup_steps + args.rl_steps
    datamodule = rl_datamodule(start, args.questions, total)
    common = rl_common(args, start)
    rows, tag_id = trl_prompts(start, datamodule, args.questions, total)
    print(f"  RL: start {start}; B={args.questions} questions x G={args.group_size} completions of <= "
          f"{args.max_new_tokens} tokens; GRPO tag id {tag_id}; {'bf16-mixed' if args.bf16 else 'fp32'}", flush=True)

    def side(kind):
        def run(warmup: bool) -> dict:
            steps = 1 if warmup else args.rl_steps
            if kind == "trl-grpo":
                return run_trl_grpo(start, rows, args, steps, args.warmup_steps)
            return run_forklight_rl(kind, common, datamodule, steps, args.warmup_steps, args.bf16)
        return run

    sides = {"gfpo": side("gfpo")}
    if not args.skip_forklight_grpo:
        sides["grpo"] = side("grpo")
    sides["trl-grpo"] = side("trl-grpo")
    runs = alternate(sides, args.repeats)
    summary = {name: {key: median_of_runs(method_runs, key) for key in
                      ("step_s", "generate_s", "update_s", "generate_share", "completion_tokens")}
               for name, method_runs in runs.items()}
    for name, method_runs in runs.items():
        summary[name]["step_s_min"] = fastest_step(method_runs)
    trl_step, trl_fastest = summary["trl-grpo"]["step_s"], summary["trl-grpo"]["step_s_min"]
    for values in summary.values():
        values["over_trl_grpo"] = values["step_s"] / trl_step
        values["over_trl_grpo_fastest"] = values["step_s_min"] / trl_fastest
        values["s_per_1k_completion_tokens"] = 1000 * values["step_s"] / max(values["completion_tokens"], 1.0)
    return {"start": start, "questions": args.questions, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "precision": "bf16-mixed" if args.bf16 else "fp32",
            "gfpo_over_trl_grpo": summary["gfpo"]["over_trl_grpo"],
            "gfpo_over_trl_grpo_fastest": summary["gfpo"]["over_trl_grpo_fastest"], "methods": summary, "runs": runs}


# ---- report ---------------------------------------------------------------------------------------
def print_sft(rows: list[dict]) -> None:
    print("\nSFT-mixed, whole training loop (median over runs of each run's median step; tokens = supervised; "
          "(fastest) = ratio of the best steps)")
    print(f"{'model':11s} {'params':>7s} {'prec':>10s} {'rows':>4s} {'tok/step':>8s} {'forklight s':>11s} "
          f"{'TRL s':>8s} {'forklight tok/s':>15s} {'TRL tok/s':>10s} {'speedup':>7s} {'(fastest)':>9s}")
    for row in rows:
        print(f"{row['model']:11s} {row['parameters'] / 1e6:6.1f}M {row['precision']:>10s} {row['rows_per_step']:4d} "
              f"{row['supervised_tokens_per_step']:8.0f} {row['forklight_step_s']:11.4f} {row['trl_step_s']:8.4f} "
              f"{row['forklight_tokens_per_s']:15.0f} {row['trl_tokens_per_s']:10.0f} {row['speedup']:6.2f}x "
              f"{row['speedup_best']:8.2f}x")


def print_rl(result: dict) -> None:
    print(f"\nRL step, whole training loop (B={result['questions']} x G={result['group_size']}, <= "
          f"{result['max_new_tokens']} new tokens, {result['precision']}; generate = rollouts + rewards + advantages)")
    print(f"{'method':28s} {'step s':>8s} {'generate s':>10s} {'update s':>9s} {'gen share':>9s} "
          f"{'compl tok':>9s} {'s/1k tok':>8s} {'/ TRL GRPO':>10s} {'fastest s':>9s} {'/ TRL':>6s}")
    names = {"gfpo": "forklight GFPO (head)", "grpo": "forklight GRPO", "trl-grpo": "TRL GRPOTrainer"}
    for name, values in result["methods"].items():
        print(f"{names[name]:28s} {values['step_s']:8.3f} {values['generate_s']:10.3f} {values['update_s']:9.3f} "
              f"{values['generate_share']:9.1%} {values['completion_tokens']:9.0f} "
              f"{values['s_per_1k_completion_tokens']:8.3f} {values['over_trl_grpo']:10.3f} "
              f"{values['step_s_min']:9.3f} {values['over_trl_grpo_fastest']:6.3f}")
    print(f"GFPO step / TRL GRPO step: {result['gfpo_over_trl_grpo']:.3f} median, "
          f"{result['gfpo_over_trl_grpo_fastest']:.3f} fastest steps (target <= 0.5)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sft", "rl"], choices=["sft", "rl"])
    parser.add_argument("--sft-models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--trace-length", type=int, default=None,
                        help="tokens per random trace of the ~110M model (default 512; the toy uses its own traces)")
    parser.add_argument("--questions-sft", type=int, default=None, help="questions per SFT step (default per model)")
    parser.add_argument("--steps", type=int, default=5, help="timed SFT steps per run")
    parser.add_argument("--rl-steps", type=int, default=3, help="timed RL steps per run")
    parser.add_argument("--warmup-steps", type=int, default=1, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side (after one warm-up run each)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast over fp32 weights (default fp32)")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--init-from", default=None,
                        help="RL start: a forklight export dir (default: the newest toy SSFT export, else fresh toy weights)")
    parser.add_argument("--questions", type=int, default=16, help="RL: B, questions per step")
    parser.add_argument("--group-size", type=int, default=12, help="RL: G, completions per question (num_generations)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="RL: longest completion")
    parser.add_argument("--skip-forklight-grpo", action="store_true", help="RL: time only GFPO and TRL GRPO")
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS),
                        help="wall time (default), or this process's CPU time summed over its threads: a proxy that "
                             "other processes' load hardly moves, for a shared CPU-only machine (meaningless on a GPU)")
    parser.add_argument("--output", default="benchmarks/results/vs_trl.json", help="where the JSON goes")
    parser.add_argument("--quick", action="store_true", help="toy only, few steps and small RL batches (a smoke run)")
    args = parser.parse_args()
    _clock[0] = CLOCKS[args.clock]
    if args.quick:
        args.sft_models, args.steps, args.rl_steps, args.repeats = ["toy"], 3, 2, 1
        args.questions, args.group_size, args.max_new_tokens = 4, 4, 32
    trl = require_trl()
    quiet()
    import lightning
    import transformers

    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu, threads={torch.get_num_threads()}"
    print(f"forklight vs TRL {trl.__version__} (transformers {transformers.__version__}, lightning "
          f"{lightning.__version__}, torch {torch.__version__}; {device}; {args.clock} clock)", flush=True)
    record = {"trl": trl.__version__, "transformers": transformers.__version__, "lightning": lightning.__version__,
              "torch": torch.__version__, "device": device, "steps": args.steps, "rl_steps": args.rl_steps,
              "warmup_steps": args.warmup_steps, "repeats": args.repeats, "clock": args.clock}
    if "sft" in args.parts:
        record["sft"] = [compare_sft(name, args) for name in args.sft_models]
    if "rl" in args.parts:
        record["rl"] = compare_rl(args)
    if "sft" in args.parts:
        print_sft(record["sft"])
    if "rl" in args.parts:
        print_rl(record["rl"])
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
