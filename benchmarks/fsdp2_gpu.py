"""FSDP2 on GPUs (issue 20's GPU check): a few SSFT steps of a Qwen2.5-0.5B/1.5B-shaped model, memory and tokens/s.

    python -m benchmarks.fsdp2_gpu                                   # every GPU, Qwen2.5-0.5B shape, 3 sides (~4 min)
    python -m benchmarks.fsdp2_gpu --architecture qwen2.5-1.5b --sides mixed autocast
    python -m benchmarks.fsdp2_gpu --device cpu --architecture tiny --sides mixed --length 64   # a smoke run, no GPU

Each side is one ``forklight fit -c <run yaml> -c configs/strategies/fsdp2.yaml`` on all visible GPUs
(``--devices``; data_parallel_size = devices), fresh weights of the architecture's shape (``benchmarks.engines.
ARCHITECTURES``, vocabulary 152,064, tied head; built from a config: no hub access) with the toy tokenizer,
``model.dtype: bfloat16``, ``gradient_checkpointing``, sdpa, the chunked head, N = 6 fork tokens, and a synthetic
train file: per rank and step one question with 4 traces of ``--length`` random characters (so T tokens are known),
``match_prefix_tokens`` 64. The sides differ only in precision:

- ``mixed`` (new): ``trainer.precision: 32-true`` and ``trainer.strategy.init_args.param_dtype: bfloat16`` (FSDP2's
  ``MixedPrecisionPolicy``: bfloat16 all-gathers and compute over float32 master shards, float32 gradient
  reduce-scatter, float32 AdamW state);
- ``autocast`` (the old way): ``trainer.precision: bf16-mixed``: float32 masters all-gathered in float32, autocast;
- ``bf16-true``: bfloat16 weights and AdamW state (least memory; updates below 2^-9 of a weight round away);
- ``offload``: ``mixed`` plus ``cpu_offload: true`` (shards, gradients and AdamW state in host memory).

A callback in each rank records, per step: wall time (CUDA synchronised), supervised tokens (``perf/tokens_per_s``'s
count), and the peak of ``torch.cuda.max_memory_allocated`` since the step began; steps after ``--warmup`` count.
Printed per side: median step seconds, tokens/s over all ranks, peak GPU memory (max over ranks, GiB), and the ratio
to the first side. Writes ``benchmarks/results/fsdp2_gpu.json``. CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from benchmarks.timing import RESULTS, child_environment, write_results

REPO = Path(__file__).resolve().parents[1]
SIDES = {
    "mixed": ["--trainer.precision=32-true", "--trainer.strategy.init_args.param_dtype=bfloat16"],
    "autocast": ["--trainer.precision=bf16-mixed"],
    "bf16-true": ["--trainer.precision=bf16-true"],
    "offload": ["--trainer.precision=32-true", "--trainer.strategy.init_args.param_dtype=bfloat16",
                "--trainer.strategy.init_args.cpu_offload=true"],
}
TINY = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "intermediate_size": 128, "tie_word_embeddings": True}
RUN_YAML = """\
seed_everything: 0
trainer:
  accelerator: {accelerator}
  devices: {devices}
  max_steps: {steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  default_root_dir: {output}  # the saved config.yaml lands here, not in the repository
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: benchmarks.fsdp2_gpu.StepProbe
      init_args:
        output: {output}
  strategy:
    init_args:
      data_parallel_size: {devices}
model:
  class_path: forklight.modules.ssft.SSFTModule
  init_args:
    model_config: {model_config}
    tokenizer: toy
    dtype: bfloat16
    gradient_checkpointing: true
    attn_implementation: sdpa
    loss_head: chunked
    num_fork_tokens: 6
    match_prefix_tokens: 64
    learning_rate: 1.0e-5
    max_new_tokens: 8
data:
  class_path: forklight.data.datamodule.ForkDataModule
  init_args:
    train: {train}
    val_size: 0
    batch_size: 1
    max_length: {max_length}
"""


class StepProbe(L.Callback):
    def __init__(self, output: str) -> None:
        """Write ``<output>/rank<r>.json``: per step seconds, supervised tokens and peak GPU memory (bytes).

        Args:
            output: a directory.
        """
        self.output = output
        self.steps: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        from forklight.callbacks.perf import batch_tokens

        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(pl_module.device)
        self.steps.append({"seconds": time.perf_counter() - self.started, "tokens": batch_tokens(batch)[0],
                           "peak_bytes": torch.cuda.max_memory_allocated(pl_module.device) if cuda else 0})

    def on_train_end(self, trainer, pl_module) -> None:
        os.makedirs(self.output, exist_ok=True)
        with open(os.path.join(self.output, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(self.steps, handle)


def train_file(path: Path, questions: int, length: int) -> Path:
    """``questions`` questions of 4 traces, each ``length`` random characters of the toy alphabet (then its end)."""
    generator = random.Random(0)
    alphabet = "0123456789+-=*/abcdefghijklmnopqrstuvwxyz "
    with open(path, "w") as handle:
        for index in range(questions):
            traces = ["".join(generator.choice(alphabet) for _ in range(length)) for _ in range(4)]
            handle.write(json.dumps({"id": f"q{index}", "prompt": f"{index}+1=?", "answer": str(index + 1),
                                     "traces": traces}) + "\n")
    return path


def run_side(side: str, args, work: Path, model_config: dict, devices: int) -> dict:
    output = work / side
    config = work / f"{side}.yaml"
    accelerator = "gpu" if args.device == "cuda" else "cpu"
    config.write_text(RUN_YAML.format(accelerator=accelerator, devices=devices, steps=args.steps, output=output,
                                      model_config=json.dumps(model_config), train=work / "train.jsonl",
                                      max_length=args.length + 64))
    command = [sys.executable, "-m", "forklight", "fit", "-c", str(REPO / "configs" / "strategies" / "fsdp2.yaml"),
               "-c", str(config), *SIDES[side]]
    environment = child_environment(str(REPO))
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["?"])[-1]
        out_of_memory = "OutOfMemoryError" in result.stderr or "out of memory" in result.stderr
        print(f"  {side}: failed ({'out of memory' if out_of_memory else error})\n{result.stderr[-3000:]}", flush=True)
        return {"side": side, "failed": "out of memory" if out_of_memory else error}
    ranks = [json.loads((output / f"rank{rank}.json").read_text()) for rank in range(devices)]
    timed = [[step for step in steps[args.warmup:]] for steps in ranks]
    seconds = statistics.median(max(rank[k]["seconds"] for rank in timed) for k in range(len(timed[0])))
    tokens = statistics.median(sum(rank[k]["tokens"] for rank in timed) for k in range(len(timed[0])))
    peak = max(step["peak_bytes"] for rank in ranks for step in rank)
    record = {"side": side, "step_s": seconds, "tokens_per_step": tokens, "tokens_per_s": tokens / seconds,
              "peak_gib": peak / 2**30, "run_s": wall}
    print(f"  {side}: " + ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)), flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b", "tiny"])
    parser.add_argument("--sides", nargs="+", default=["mixed", "autocast", "bf16-true"], choices=list(SIDES))
    parser.add_argument("--length", type=int, default=2048, help="characters (= tokens) per trace")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2, help="first steps not counted")
    parser.add_argument("--devices", type=int, help="default: every visible GPU (CPU: 2 processes)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--output", default=f"{RESULTS}/fsdp2_gpu.json")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: run with --device cpu --architecture tiny for a smoke run")
    devices = args.devices or (torch.cuda.device_count() if args.device == "cuda" else 2)
    from benchmarks.engines import ARCHITECTURES

    shape = TINY if args.architecture == "tiny" else ARCHITECTURES[args.architecture]
    model_config = {**shape, "vocab_size": 152_064, "max_position_embeddings": max(4096, args.length + 128)}
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"{args.architecture} on {devices} x {name}, T = {args.length}, {args.steps} steps ({args.warmup} warm-up)",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="forklight-fsdp2-gpu-") as scratch:
        work = Path(scratch)
        train_file(work / "train.jsonl", devices * (args.steps + 2), args.length)
        records = [run_side(side, args, work, model_config, devices) for side in args.sides]
    first = next((record for record in records if "failed" not in record), None)
    print("\n| side | step s | tokens/s (all ranks) | peak GPU GiB (max rank) | tokens/s vs first | memory vs first |")
    print("|---|---|---|---|---|---|")
    for record in records:
        if "failed" in record:
            print(f"| {record['side']} | {record['failed']} | | | | |")
            continue
        speed = record["tokens_per_s"] / first["tokens_per_s"]
        memory = record["peak_gib"] / first["peak_gib"] if first["peak_gib"] else float("nan")
        print(f"| {record['side']} | {record['step_s']:.3f} | {record['tokens_per_s']:,.0f} | {record['peak_gib']:.2f} | "
              f"{speed:.2f}x | {memory:.2f}x |")
    write_results(args.output, {"architecture": args.architecture, "devices": devices, "device": name,
                                "length": args.length, "steps": args.steps, "warmup": args.warmup, "sides": records})


if __name__ == "__main__":
    main()
