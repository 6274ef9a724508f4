"""Model FLOP utilisation (MFU) of forklight SFT training against this machine's measured matmul rate.

    python -m benchmarks.mfu --quick        # toy model only, small matmuls, few steps (~1 minute on 2 CPU cores)
    python -m benchmarks.mfu                # toy GPT + ~110M Llama, fp32 and bf16-mixed (~3 minutes on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.mfu --clock cpu    # on a CPU machine others are using too
    python -m benchmarks.mfu --models llama-110m --questions 8 --steps 20     # e.g. on a GPU: bigger batches

1. **Peak**: square ``torch.matmul`` of each ``--sizes`` (2*n^3 FLOPs), fp32 and bf16, one warm-up
   then ``--matmul-repeats`` calls each; a size's rate is its median, the dtype's peak the best
   size's. That is an achievable rate on this device (not the datasheet number) and is measured
   with the same settings the training uses (on CUDA, TF32 stays as torch leaves it: off for
   matmuls unless you enable it).
2. **Training**: forklight SFT-mixed (``SSFTModule(matching="single", num_fork_tokens=1)``: no
   matching passes, every FLOP is a training FLOP) under a Lightning ``Trainer(max_steps=...)``,
   in ``32-true`` and ``bf16-mixed`` (autocast over fp32 weights); per step, wall time from the end
   of the previous step (data, forward, backward, AdamW, loop), ``--warmup-steps`` excluded. Same
   models and data as ``benchmarks.vs_trl`` (``benchmarks/workloads.py``): the toy GPT on toy traces
   (4 questions x 4 traces a step) and the ~110M Llama on random ``--trace-length``-token traces
   (1 question x 4 traces a step).
3. **Model FLOPs** of a row of T real tokens (prompt + tag + trace; padding not counted), PaLM's
   formula (Chowdhery et al. 2022, appendix B), forward + backward::

       6 * N * T  +  12 * L * d * T^2

   N = the parameters that take part in matmuls: all parameters minus the embedding lookups
   (token and learned position embeddings), plus the output projection once even when it is tied
   to the input embedding (its V*d matmul runs either way); L layers, d hidden size. The second
   term is attention's QK^T and AV (2 * 2 * T * d per token and layer forward, x3 with backward),
   counted for the full T x T square as PaLM does (a causal kernel may skip half of it).
   Achieved FLOP/s = model FLOPs of the timed steps / their seconds; **MFU** = achieved / measured
   peak of the same dtype (fp32 training vs the fp32 peak, bf16-mixed vs the bf16 peak); also the
   fastest step's. The
   (6N-only) ``perf/mfu`` of ``forklight.callbacks.PerfMonitor`` leaves out the attention term.

Prints a table and writes ``benchmarks/results/mfu.json``.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.timing import CLOCKS, RESULTS, Clock, add_clock_argument, median_seconds, quiet, release, write_results
from benchmarks.workloads import SFT_MODELS, model_spec, planned_rows, run_forklight_sft, sft_datamodule, sft_module

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(size: int, dtype: torch.dtype, repeats: int, device: torch.device, clock: Clock) -> float:
    """Median FLOP/s of ``repeats`` square matmuls of ``size`` (after one warm-up call)."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device).to(dtype)
    b = torch.randn(size, size, generator=generator, device=device).to(dtype)
    with torch.no_grad():
        return 2 * size**3 / median_seconds(lambda: torch.matmul(a, b), repeats, clock)


def measure_peaks(sizes: list[int], repeats: int, device: torch.device, clock: Clock) -> dict:
    peaks = {}
    for name, dtype in DTYPES.items():
        rates = {size: matmul_rate(size, dtype, repeats, device, clock) for size in sizes}
        peaks[name] = {"peak_flops": max(rates.values()), "by_size": rates}
        print(f"  matmul {name}: " + ", ".join(f"{size}^2 {rate / 1e12:.3g}" for size, rate in rates.items())
              + " TFLOP/s", flush=True)
        release()
    return peaks


def flop_counts(model) -> dict:
    """N (matmul parameters), L and d of an HF causal LM (see the module docstring)."""
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight
    tied = any(head is weight for weight in embeddings)
    matmul = total - sum(w.numel() for w in embeddings) + (head.numel() if tied else 0)
    config = model.config.get_text_config()
    return {"parameters": total, "matmul_parameters": matmul, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "tied_head": tied}


def row_flops(tokens: int, counts: dict) -> float:
    """Forward + backward model FLOPs of one row of ``tokens`` real tokens (PaLM)."""
    return 6 * counts["matmul_parameters"] * tokens + 12 * counts["layers"] * counts["hidden"] * tokens**2


def measure_training(name: str, precision: str, args, peaks: dict, clock: Clock) -> dict:
    spec = model_spec(name, args.trace_length, args.questions)
    total = args.warmup_steps + args.steps
    datamodule = sft_datamodule(spec, total, seed=1)
    datamodule.setup("fit")
    probe = sft_module(spec, args.learning_rate)
    probe.configure_model()
    counts = flop_counts(probe.model)
    rows, _, _ = planned_rows(datamodule, total, probe.fork_token_ids[0])
    del probe
    rows_per_step = spec["questions"] * spec["traces"]
    steps = [rows[k * rows_per_step : (k + 1) * rows_per_step] for k in range(total)]
    step_flops = [sum(row_flops(len(row["input_ids"]), counts) for row in step) for step in steps]
    step_tokens = [sum(len(row["input_ids"]) for row in step) for step in steps]
    padded = [len(step) * max(len(row["input_ids"]) for row in step) for step in steps]
    runs = []
    for _ in range(args.repeats):
        result = run_forklight_sft(spec, datamodule, args.steps, args.warmup_steps, precision == "bf16-mixed",
                                   args.learning_rate, clock)
        seconds = result["step_s_all"]
        achieved = sum(step_flops[args.warmup_steps :]) / sum(seconds)
        best = max(f / t for f, t in zip(step_flops[args.warmup_steps :], seconds))  # fastest step, by its FLOPs
        runs.append({"step_s": statistics.median(seconds), "achieved_flops": achieved, "best_step_flops": best,
                     "step_s_all": seconds})
        release()
    achieved = statistics.median(run["achieved_flops"] for run in runs)
    peak = peaks["bf16" if precision == "bf16-mixed" else "fp32"]["peak_flops"]
    return {"model": name, "precision": precision, **counts, "rows_per_step": rows_per_step,
            "tokens_per_step": statistics.mean(step_tokens[args.warmup_steps :]),
            "padding_share": 1 - sum(step_tokens) / sum(padded),
            "model_flops_per_step": statistics.mean(step_flops[args.warmup_steps :]),
            "attention_share": 1 - sum(6 * counts["matmul_parameters"] * t for t in step_tokens) / sum(step_flops),
            "step_s": statistics.median(run["step_s"] for run in runs), "achieved_flops": achieved,
            "peak_flops": peak, "mfu": achieved / peak,
            "mfu_best_step": max(run["best_step_flops"] for run in runs) / peak, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(SFT_MODELS), choices=list(SFT_MODELS))
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"], choices=["32-true", "bf16-mixed"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="square matmul sizes for the peak")
    parser.add_argument("--matmul-repeats", type=int, default=5)
    parser.add_argument("--trace-length", type=int, default=None, help="trace tokens of the ~110M model (default 512)")
    parser.add_argument("--questions", type=int, default=None, help="questions per step (default per model; 4 traces each)")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per run")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps at the start of every run")
    parser.add_argument("--repeats", type=int, default=1, help="training runs per (model, precision); median")
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    add_clock_argument(parser, help="wall time (default) or this process's CPU time, for the peak and the steps "
                                    "alike: on a shared CPU-only machine run with OMP_NUM_THREADS=1 and --clock cpu "
                                    "(meaningless on a GPU)")
    parser.add_argument("--output", default=f"{RESULTS}/mfu.json", help="where the JSON goes")
    parser.add_argument("--quick", action="store_true", help="toy only, 512/1024 matmuls, few steps (a smoke run)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    if args.quick:
        args.models, args.sizes, args.matmul_repeats, args.steps, args.warmup_steps = ["toy"], [512, 1024], 3, 3, 1
    quiet()
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, threads={torch.get_num_threads()}"
    print(f"MFU of forklight SFT training (torch {torch.__version__}; {where}; {args.clock} clock)", flush=True)
    peaks = measure_peaks(args.sizes, args.matmul_repeats, device, clock)
    rows = []
    for name in args.models:
        for precision in args.precisions:
            rows.append(measure_training(name, precision, args, peaks, clock))
            row = rows[-1]
            print(f"  {name} {precision}: {row['step_s']:.4f} s/step, {row['achieved_flops'] / 1e12:.4g} TFLOP/s, "
                  f"MFU {row['mfu']:.1%}", flush=True)
    print(f"\n{'model':11s} {'N matmul':>9s} {'precision':>10s} {'tok/step':>8s} {'pad':>5s} {'attn':>5s} "
          f"{'GFLOP/step':>10s} {'s/step':>8s} {'TFLOP/s':>8s} {'peak':>8s} {'MFU':>6s} {'best step':>9s}")
    for row in rows:
        print(f"{row['model']:11s} {row['matmul_parameters'] / 1e6:8.1f}M {row['precision']:>10s} "
              f"{row['tokens_per_step']:8.0f} {row['padding_share']:5.1%} {row['attention_share']:5.1%} "
              f"{row['model_flops_per_step'] / 1e9:10.2f} {row['step_s']:8.4f} {row['achieved_flops'] / 1e12:8.4f} "
              f"{row['peak_flops'] / 1e12:8.3f} {row['mfu']:6.1%} {row['mfu_best_step']:9.1%}")
    print("peak = best median square-matmul rate of the dtype (fp32 for 32-true, bf16 for bf16-mixed); MFU = model "
          "FLOPs of the timed steps / their seconds / peak; best step = the fastest step's; pad = padded share of the "
          "step's positions (computed, not counted); attn = attention's share of the model FLOPs")
    write_results(args.output, {"device": where, "torch": torch.__version__, "clock": args.clock, "sizes": args.sizes,
                                "peaks": peaks, "steps": args.steps, "warmup_steps": args.warmup_steps, "rows": rows})


if __name__ == "__main__":
    main()
