"""SSFT vs plain SFT: the time and peak memory of one training step on the same traces.

    python benchmarks/ssft_overhead.py            # quick grid (a few minutes on 2 CPU cores)
    python benchmarks/ssft_overhead.py --full     # every (N, M, match_prefix_tokens) for both model sizes

One SSFT step is ``SSFTModule.match`` (the N*M no-grad cost forwards of ``trace_tag_costs`` and
the Hungarian matching) + ``matched_loss`` forward/backward + an AdamW step. The SFT step is the
same ``matched_loss`` forward/backward + AdamW step on the same B*M rows, with a fixed assignment
(trace j -> tag j) instead of the matching. Traces are random token ids of a fixed length (distinct
traces, so the cost matrix shares no rows), after real toy prompts.

Two models: the toy GPT of ``configs/ssft.yaml`` (B=4 questions, as its data config) and a
~110M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied embeddings;
B=1 question, 512-token traces). Each (model, N, M, prefix) is timed in a fresh subprocess that
alternates SFT and SSFT steps on one model (one warm-up each, then ``--repeats`` pairs), so other
load on the machine hits both alike; ``time x`` is the ratio of the fastest steps, ``med x`` of
the medians. Peak memory: one step of each method in its own fresh subprocess, which reports its
``ru_maxrss`` (weights, AdamW state, activations and the Python/torch runtime, so the memory ratio
understates the activation difference). Prints SSFT/SFT ratios (targets: time <= 1.3 at N=6, M=4, prefix = a quarter of
the trace; memory <= 1.2); writes ``benchmarks/results/ssft_overhead.json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TOY_MODEL = {"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4, "n_inner": 512, "n_positions": 256,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False}
LLAMA_110M = {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12, "intermediate_size": 2048, "vocab_size": 32000,
              "max_position_embeddings": 1024, "tie_word_embeddings": True}
MODELS = {"toy": {"model_config": TOY_MODEL, "questions": 4, "trace_length": 200},
          "llama-110m": {"model_config": LLAMA_110M, "questions": 1, "trace_length": 512}}


def synthetic_batch(module, questions: int, traces_per_question: int, trace_length: int, seed: int):
    """A TraceSetBatch of toy prompts, each with M random traces of ``trace_length`` ids (end-of-turn last)."""
    import torch

    from forklight.data.rendering import TraceSetBatch, render_prompt_ids
    from forklight.data.toy import generate_toy_records

    generator = torch.Generator().manual_seed(seed)
    records = generate_toy_records(questions, seed=seed)
    end_id = module.stop_ids[0]
    low, high = 10, min(module._vocab_before_fork_tokens, module.model.config.vocab_size)
    trace_ids = [
        [torch.cat([torch.randint(low, high, (trace_length - 1,), generator=generator), torch.tensor([end_id])])
         for _ in range(traces_per_question)]
        for _ in records
    ]
    return TraceSetBatch(
        ids=[r.id for r in records],
        prompt_ids=[torch.tensor(render_prompt_ids(module.tokenizer, r), dtype=torch.long) for r in records],
        trace_ids=trace_ids,
        sources=[[None] * traces_per_question for _ in records],
        answers=[r.answer for r in records],
        columns=[{} for _ in records],
    )


def worker(spec: dict) -> dict:
    """In this (fresh) process: ``mode: time`` alternates SFT and SSFT steps on one model (so load
    from other processes hits both alike) and reports both; ``mode: sft|ssft`` takes one step of
    that method only and reports this process's peak RSS."""
    import numpy as np
    import torch

    from forklight.modules.ssft import SSFTModule

    torch.manual_seed(0)
    model = MODELS[spec["model"]]
    module = SSFTModule(model_config=model["model_config"], tokenizer="toy", num_fork_tokens=spec["N"],
                        match_prefix_tokens=spec["prefix"], matching="hungarian")
    module.configure_model()
    batch = synthetic_batch(module, spec["questions"], spec["M"], spec["trace_length"], seed=1)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    fixed = [np.arange(spec["M"]) % spec["N"] for _ in batch.trace_ids]  # SFT: trace j -> tag j

    def step(method: str) -> tuple[float, float]:
        """(step seconds, matching seconds) of one optimiser step."""
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        assignments = module.match(batch) if method == "ssft" else fixed
        matched = time.perf_counter()
        loss, _ = module.matched_loss(batch, assignments)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started, matched - started

    if spec["mode"] != "time":
        step(spec["mode"])
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    samples: dict[str, list[tuple[float, float]]] = {"sft": [], "ssft": []}
    for repeat in range(spec["repeats"] + 1):  # the first of each is a warm-up
        for method in ("sft", "ssft"):
            samples[method].append(step(method))
    result = {"parameters": sum(p.numel() for p in module.model.parameters()), "threads": torch.get_num_threads()}
    for method, timed in samples.items():
        steps = [s for s, _ in timed[1:]]
        result[method] = {"step_s_min": min(steps), "step_s_median": statistics.median(steps),
                          "match_s_min": min(m for _, m in timed[1:]), "step_s_all": steps}
    return result


def run_in_subprocess(spec: dict) -> dict:
    output = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True,
                            capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def grid(full: bool, models: list[str]) -> list[dict]:
    """(model, N, M, prefix) configurations; prefix None = the whole trace."""
    configs = []
    for name in models:
        if name == "toy" or full:
            shapes = itertools.product((2, 6), (2, 4), (16, 128, None))
        else:  # quick: the target row only (N=6, M=4, prefix = a quarter of a 512-token trace)
            shapes = [(6, 4, 128)]
        configs += [{"model": name, "N": n, "M": m, "prefix": p} for n, m, p in shapes if m <= n]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole grid for the ~110M model too (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per toy configuration (after one warm-up)")
    parser.add_argument("--big-repeats", type=int, default=1, help="timed steps per ~110M configuration")
    parser.add_argument("--big-trace-length", type=int, default=MODELS["llama-110m"]["trace_length"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    rows = []
    header = (f"{'model':11s} {'N':>2s} {'M':>2s} {'L':>4s} {'prefix':>6s} {'SFT s':>8s} {'SSFT s':>8s} "
              f"{'match s':>8s} {'time x':>7s} {'med x':>7s} {'SFT MB':>7s} {'SSFT MB':>8s} {'mem x':>6s}")
    print(header)
    for config in grid(args.full, args.models):
        model = MODELS[config["model"]]
        big = config["model"] != "toy"
        spec = {**config, "questions": model["questions"],
                "trace_length": args.big_trace_length if big else model["trace_length"],
                "repeats": args.big_repeats if big else args.repeats}
        timed = run_in_subprocess({**spec, "mode": "time"})
        sft, ssft = timed["sft"], timed["ssft"]
        sft["peak_rss_mb"] = run_in_subprocess({**spec, "mode": "sft"})["peak_rss_mb"]
        ssft["peak_rss_mb"] = run_in_subprocess({**spec, "mode": "ssft"})["peak_rss_mb"]
        row = {**spec, "parameters": timed["parameters"], "threads": timed["threads"], "sft": sft, "ssft": ssft,
               "time_ratio": ssft["step_s_min"] / sft["step_s_min"],
               "time_ratio_median": ssft["step_s_median"] / sft["step_s_median"],
               "memory_ratio": ssft["peak_rss_mb"] / sft["peak_rss_mb"]}
        rows.append(row)
        prefix = "full" if config["prefix"] is None else str(config["prefix"])
        print(f"{config['model']:11s} {config['N']:2d} {config['M']:2d} {spec['trace_length']:4d} {prefix:>6s} "
              f"{sft['step_s_min']:8.3f} {ssft['step_s_min']:8.3f} {ssft['match_s_min']:8.3f} {row['time_ratio']:7.2f} "
              f"{row['time_ratio_median']:7.2f} "
              f"{sft['peak_rss_mb']:7.0f} {ssft['peak_rss_mb']:8.0f} {row['memory_ratio']:6.2f}", flush=True)
    print(f"seconds: fastest of the timed steps; B questions per step: toy {MODELS['toy']['questions']}, llama-110m {MODELS['llama-110m']['questions']}; "
          f"torch threads {rows[0]['threads']}; parameters: " +
          ", ".join(sorted({f"{r['model']} {r['parameters'] / 1e6:.1f}M" for r in rows})))
    os.makedirs("benchmarks/results", exist_ok=True)
    suffix = "" if set(args.models) == set(MODELS) else "_" + "_".join(args.models)
    path = f"benchmarks/results/ssft_overhead{suffix}.json"
    with open(path, "w") as handle:
        json.dump({"full": args.full, "models": args.models, "rows": rows}, handle, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
