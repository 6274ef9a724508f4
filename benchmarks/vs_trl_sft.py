"""SFT-mixed throughput, forklight against TRL's ``SFTTrainer`` (``python -m benchmarks.vs_trl --parts sft``).

The protocol is in :mod:`benchmarks.vs_trl`: both sides train the same fresh weights on the same
rows in the same order; TRL gets them pre-tokenised (labels -100 on prompt and tag), and the
comparison checks both saw the same batches and supervised tokens.
"""

from __future__ import annotations

import statistics
import tempfile

import torch

from benchmarks.timing import Clock, alternate, count_supervised_tokens, hf_step_timer, median_of_runs, step_seconds
from benchmarks.workloads import model_spec, planned_rows, run_forklight_sft, sft_datamodule, sft_module, throughput


def run_trl_sft(spec: dict, rows: list[dict], rows_per_step: int, steps: int, warmup_steps: int, bf16: bool,
                learning_rate: float, clock: Clock) -> dict:
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
    timer = hf_step_timer(clock)
    trainer = SFTTrainer(model=module.model, args=args, train_dataset=Dataset.from_list(rows[: rows_per_step * total]),
                         processing_class=module.tokenizer, callbacks=[timer])
    trainer.remove_callback(PrinterCallback)  # its end-of-training summary line
    supervised = count_supervised_tokens(trainer)
    trainer.train()
    return throughput(step_seconds(timer, warmup_steps), supervised[warmup_steps:total])


def best_throughput(runs: list[dict]) -> float:
    return max(max(t / s for t, s in zip(run["supervised_tokens"], run["step_s_all"])) for run in runs)


def compare_sft(name: str, args, clock: Clock) -> dict:
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
                                   args.learning_rate, clock)
        expected = batch_ids[args.warmup_steps : args.warmup_steps + len(result["supervised_tokens"])]
        assert result.pop("batch_ids")[args.warmup_steps :] == expected, "forklight trained other batches than planned"
        return result

    def trl_side(warmup: bool) -> dict:
        result = run_trl_sft(spec, rows, rows_per_step, 1 if warmup else args.steps, args.warmup_steps, args.bf16,
                             args.learning_rate, clock)
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
