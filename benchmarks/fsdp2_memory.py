"""FSDP2 host memory per rank (issue 20): every rank building the whole model (before) vs meta-device construction.

    python -m benchmarks.fsdp2_memory              # the 374M Llama (~1.5 GB in float32): ~6 minutes on 2 CPU cores
    python -m benchmarks.fsdp2_memory --quick      # a 44M Llama: a smoke run (~1 minute)
    python -m benchmarks.fsdp2_memory --model-dir /tmp/llama374m   # keep (and re-use) the saved checkpoint

Protocol. A Llama-style model is built from a config with fresh weights (hidden 1024, 24 layers, 16 heads, MLP
2816, vocabulary 32,000, untied head: 374M parameters; ``--quick``: hidden 512, 8 layers, MLP 1408: 44M) and saved
first as a plain Hugging Face checkpoint (float32 safetensors, forklight's toy tokenizer, no fork tokens: each run
adds 6, whose rows are new). Then ``forklight fit -c <run yaml> -c configs/strategies/fsdp2.yaml``, 2 CPU processes
(gloo), one SSFT step on the toy task (1 question of 4 traces per rank, ``max_length`` 64), float32, no validation,
checkpoint or export, once per side, one after the other:

- ``whole (before)``: ``trainer.strategy.init_args.meta_init=false``: every rank ``from_pretrained``s the whole model,
  adds the fork rows, then ``fully_shard`` frees all but its half;
- ``meta (new)``: ``meta_init=true`` (the default): the skeleton on the meta device is sharded, rank 0 reads the
  safetensors a group of at most 256 MiB at a time (``forklight.sharded_weights.FILL_GROUP_BYTES``) and broadcasts
  it, each rank keeps its half.

A callback (:class:`MemoryProbe`) reads, on every rank: ``VmRSS`` when the trainer sets up (before the model is built:
Python, torch, transformers, the data; the **baseline**), the process's resident-memory high-water mark
(``ru_maxrss``) when training starts (**setup peak**: model built, sharded, filled, optimiser made) and after the
first optimiser step (**first-step peak**: + gradients and AdamW's two moments, float32 and sharded in both sides),
and the setup's wall time. Resident memory counts the pages of memory-mapped files that were read.

Prints one row per side and rank, then the ratios new/before side by side, and writes
``benchmarks/results/fsdp2_memory.json``. Target: the new setup peak per rank <= 1/2 of the old (the model part,
peak - baseline, <= 1/world_size of the float32 model plus a fixed overhead: one read group on rank 0, one broadcast
tensor on the others). The first-step peak holds each rank's gradients and AdamW state, the same 3 x 1/world_size
of the model on both sides, so there the ratio is bounded below by the optimiser, not by loading.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

from benchmarks.timing import RESULTS, child_environment, peak_rss_mib, rss_mib, write_results

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
LLAMA_374M = {"model_type": "llama", "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
              "num_key_value_heads": 16, "intermediate_size": 2816, "vocab_size": 32_000,
              "max_position_embeddings": 256, "tie_word_embeddings": False}
LLAMA_44M = {**LLAMA_374M, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
             "num_key_value_heads": 8, "intermediate_size": 1408}
SIDES = {"whole": ("whole (before)", "false"), "meta": ("meta (new)", "true")}
SETTINGS = {  # how the checkpoint is saved, and the run's options
    "float32": {"checkpoint_dtype": "float32", "arguments": []},
    # The paper-scale setting: a bfloat16 checkpoint, float32 master shards, bfloat16 compute (FSDP2 mixed precision).
    "bfloat16": {"checkpoint_dtype": "bfloat16", "arguments": ["--model.init_args.dtype=bfloat16",
                                                               "--trainer.strategy.init_args.param_dtype=bfloat16"]},
}
RUN_YAML = """\
seed_everything: 0
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 1
  limit_val_batches: 0
  num_sanity_val_steps: 0
  logger: false
  default_root_dir: {output}  # the saved config.yaml lands here, not in the repository
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  callbacks:
    - class_path: benchmarks.fsdp2_memory.MemoryProbe
      init_args:
        output: {output}
model:
  class_path: forklight.modules.ssft.SSFTModule
  init_args:
    name_or_path: {model}
    num_fork_tokens: 6
    match_prefix_tokens: 1
    learning_rate: 1.0e-5
    max_new_tokens: 8
data:
  class_path: forklight.data.datamodule.ForkDataModule
  init_args:
    toy:
      num_train: 64
      num_val: 4
      num_test: 4
    batch_size: 1
    max_length: 64
"""


# ---- the probe, inside each rank of the run -------------------------------------------------------
class MemoryProbe(L.Callback):
    def __init__(self, output: str) -> None:
        """Write ``<output>/rank<r>.json``: baseline RSS, setup peak, first-step peak (MiB), setup seconds.

        Args:
            output: a directory.
        """
        self.output = output
        self.record: dict = {}

    def setup(self, trainer, pl_module, stage: str) -> None:  # before configure_model
        self.record = {"rank": trainer.global_rank, "baseline_mib": rss_mib(), "peak_before_setup_mib": peak_rss_mib()}
        self.started = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["setup_peak_mib"] = peak_rss_mib()
        self.record["setup_s"] = time.perf_counter() - self.started
        self.record["local_parameters"] = sum(
            (p.to_local() if hasattr(p, "to_local") else p).numel() for p in pl_module.model.parameters())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if "step_peak_mib" not in self.record:
            self.record["step_peak_mib"] = peak_rss_mib()
            os.makedirs(self.output, exist_ok=True)
            with open(os.path.join(self.output, f"rank{trainer.global_rank}.json"), "w") as handle:
                json.dump(self.record, handle)


# ---- the benchmark -----------------------------------------------------------------------------
def save_checkpoint(directory: Path, config: dict, dtype: str) -> int:
    """The model of ``config`` with fresh weights (seed 0), saved in ``dtype`` as a Hugging Face checkpoint with the toy
    tokenizer (once: an existing one is re-used). Returns its parameter count."""
    if (directory / "config.json").is_file():
        return json.loads((directory / "forklight_bench.json").read_text())["parameters"]
    import torch

    from forklight.data.rendering import load_tokenizer
    from forklight.models import DTYPES, build_causal_lm

    tokenizer = load_tokenizer("toy", False)
    torch.manual_seed(0)
    model = build_causal_lm(None, config, tokenizer, None, False).to(DTYPES[dtype])
    parameters = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "forklight_bench.json").write_text(json.dumps({"parameters": parameters}))
    return parameters


def save_checkpoint_in_a_subprocess(directory: Path, quick: bool, dtype: str) -> int:
    """:func:`save_checkpoint` in its own process, which then exits: this one never holds the model's memory."""
    code = (f"from benchmarks.fsdp2_memory import LLAMA_44M, LLAMA_374M, save_checkpoint\n"
            f"print(save_checkpoint(__import__('pathlib').Path({str(directory)!r}), "
            f"{'LLAMA_44M' if quick else 'LLAMA_374M'}, {dtype!r}))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                            env=child_environment(str(REPO)))
    return int(result.stdout.split()[-1])


def run_side(setting: str, side: str, model: Path, work: Path) -> list[dict]:
    """One 2-process ``forklight fit`` under ``fsdp2.yaml``, ``meta_init`` of ``side``; every rank's record."""
    output = work / f"{setting}-{side}"
    config = work / f"{setting}-{side}.yaml"
    config.write_text(RUN_YAML.format(output=output, model=model))
    command = [sys.executable, "-m", "forklight", "fit", "-c", str(config), "-c",
               str(REPO / "configs" / "strategies" / "fsdp2.yaml"),
               f"--trainer.strategy.init_args.meta_init={SIDES[side][1]}", *SETTINGS[setting]["arguments"]]
    environment = child_environment(str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the 44M model instead of the 374M one")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--model-dir", type=Path, help="where the checkpoints are saved (re-used if there)")
    parser.add_argument("--output", default=f"{RESULTS}/fsdp2_memory.json")
    args = parser.parse_args(argv)
    config = LLAMA_44M if args.quick else LLAMA_374M
    records: dict = {}
    with tempfile.TemporaryDirectory(prefix="forklight-fsdp2-") as scratch:
        work = Path(scratch)
        models = args.model_dir or work / "models"
        for setting in args.settings:
            model = models / setting
            parameters = save_checkpoint_in_a_subprocess(model, args.quick, SETTINGS[setting]["checkpoint_dtype"])
            print(f"{setting}: {parameters / 1e6:.0f}M parameters saved in {SETTINGS[setting]['checkpoint_dtype']} at "
                  f"{model}", flush=True)
            records[setting] = {side: run_side(setting, side, model, work) for side in SIDES}
    model_mib = parameters * 4 / MIB  # the float32 (master) model
    rows, ratios = [], []
    for setting in args.settings:
        for side, (label, _) in SIDES.items():
            for record in records[setting][side]:
                rows.append({"setting": setting, "side": label, **record,
                             "model_part_mib": record["setup_peak_mib"] - record["baseline_mib"]})
        for rank in (0, 1):
            before, new = records[setting]["whole"][rank], records[setting]["meta"][rank]
            ratios.append({"setting": setting, "rank": rank,
                           "setup_peak": new["setup_peak_mib"] / before["setup_peak_mib"],
                           "model_part": (new["setup_peak_mib"] - new["baseline_mib"])
                           / (before["setup_peak_mib"] - before["baseline_mib"]),
                           "step_peak": new["step_peak_mib"] / before["step_peak_mib"]})
    print(f"\nmodel: {parameters / 1e6:.0f}M parameters, {model_mib:,.0f} MiB as float32 (M below)")
    print("\n| setting | side | rank | baseline MiB | setup peak MiB | model part (peak - baseline) | / M | "
          "first-step peak MiB | setup s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['setting']} | {row['side']} | {row['rank']} | {row['baseline_mib']:,.0f} | "
              f"{row['setup_peak_mib']:,.0f} | {row['model_part_mib']:,.0f} | {row['model_part_mib'] / model_mib:.2f} | "
              f"{row['step_peak_mib']:,.0f} | {row['setup_s']:.1f} |")
    print("\n| setting | rank | setup peak new/before | model part new/before | first-step peak new/before |")
    print("|---|---|---|---|---|")
    for ratio in ratios:
        print(f"| {ratio['setting']} | {ratio['rank']} | {ratio['setup_peak']:.2f}x | {ratio['model_part']:.2f}x | "
              f"{ratio['step_peak']:.2f}x |")
    for setting in args.settings:
        worst = max(ratio["setup_peak"] for ratio in ratios if ratio["setting"] == setting)
        print(f"target ({setting}): setup peak per rank new/before <= 0.50: {'met' if worst <= 0.5 else 'missed'} "
              f"(worst rank {worst:.2f}x)")
    write_results(args.output, {"model_config": config, "parameters": parameters, "model_mib_float32": model_mib,
                                "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
