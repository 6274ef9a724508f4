"""SSFT vs plain SFT: the time and peak memory of one training step on the same traces.

    python -m benchmarks.ssft_overhead            # quick grid (a few minutes on 2 CPU cores)
    python -m benchmarks.ssft_overhead --full     # every (N, M, match_prefix_tokens) for both model sizes
    python -m benchmarks.ssft_overhead --models llama-110m --prompt-length 96 --variants no-share bf16
    python -m benchmarks.ssft_overhead --agreement runs/ssft/version_0/checkpoints/last.ckpt   # bf16 vs fp32 matching

One SSFT step is ``SSFTModule.match`` (the N*M no-grad cost forwards of ``trace_tag_costs`` and
the Hungarian matching) + ``matched_loss`` forward/backward + an AdamW step. The SFT step is the
same ``matched_loss`` forward/backward + AdamW step on the same B*M rows, with a fixed assignment
(trace j -> tag j) instead of the matching. Traces are random token ids of a fixed length (distinct
traces, so the cost matrix shares no rows), after real toy prompts (8-16 tokens), or with
``--prompt-length L`` after a system prompt that brings the first question's prompt to L tokens
(chat-templated math prompts with a system prompt are ~64-128 tokens; the toy GPT then gets
enough learned positions for prompt + trace).

Two models: the toy GPT of ``configs/ssft.yaml`` (B=4 questions, as its data config) and a
~110M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2048, vocab 32000, tied embeddings;
B=1 question, 512-token traces). Each (model, N, M, prefix) is timed in a fresh subprocess that
alternates SFT and SSFT steps on one model (one warm-up each, then ``--repeats`` pairs), so other
load on the machine hits both alike; ``time x`` is the ratio of the fastest steps, ``med x`` of
the medians. Peak memory: one step of each method in its own fresh subprocess, which reports its
``ru_maxrss`` (weights, AdamW state, activations and the Python/torch runtime, so the memory ratio
understates the activation difference). Prints SSFT/SFT ratios (targets: time <= 1.3 at N=6,
M=4, prefix = a quarter of the trace; memory <= 1.2); writes
``benchmarks/results/ssft_overhead[_<models>][_prompt<L>].json``.

``--variants`` adds SSFT steps with other cost-matrix options, timed in the same alternation
(one row each): ``no-share`` (``match_share_prompt: false``: whole [prompt | tag | prefix] rows
instead of the prompt's KV cache) and ``bf16`` (``match_dtype: bfloat16``: cost forwards under
autocast), ``bf16-no-share`` both. ``agree`` is the share of questions whose assignment equals
the default SSFT step's on the same (final) weights: on these random traces and fresh weights all
tags cost nearly the same, so bf16 flips many assignments there (near-ties). ``--agreement CKPT``
measures it where it matters, on a trained toy SSFT checkpoint (``configs/ssft.yaml``) and toy
questions: the share of questions (and traces) whose bf16 assignment equals the fp32 one, and
the fp32-cost regret of the bf16 assignment.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.timing import RESULTS, write_results
from benchmarks.workloads import LLAMA_110M, TOY_MODEL

MODELS = {"toy": {"model_config": TOY_MODEL, "questions": 4, "trace_length": 200},
          "llama-110m": {"model_config": LLAMA_110M, "questions": 1, "trace_length": 512}}
# SSFT variants: SSFTModule options of their cost-matrix forwards ("ssft" = the defaults).
VARIANTS = {"ssft": {}, "no-share": {"match_share_prompt": False}, "bf16": {"match_dtype": "bfloat16"},
            "bf16-no-share": {"match_dtype": "bfloat16", "match_share_prompt": False}}
SYSTEM_PROMPT = ("You are a careful math tutor. Solve the problem step by step, check every step, and keep the "
                 "working short. Write the final answer after 'so'. ")


def synthetic_batch(module, questions: int, traces_per_question: int, trace_length: int, seed: int,
                    prompt_length: int = 0):
    """A TraceSetBatch of toy prompts, each with M random traces of ``trace_length`` ids (end-of-turn last).

    ``prompt_length`` > 0: a system prompt (as many characters of :data:`SYSTEM_PROMPT`, repeated,
    as needed) makes the first question's prompt that many tokens; the others differ by a few."""
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
    system = None
    if prompt_length > 0:
        base = len(render_prompt_ids(module.tokenizer, records[0], system_prompt=""))
        text = SYSTEM_PROMPT * (1 + prompt_length // len(SYSTEM_PROMPT))
        system = text[: max(0, prompt_length - base)]  # the toy tokenizer is character-level
    return TraceSetBatch(
        ids=[r.id for r in records],
        prompt_ids=[torch.tensor(render_prompt_ids(module.tokenizer, r, system_prompt=system), dtype=torch.long)
                    for r in records],
        trace_ids=trace_ids,
        sources=[[None] * traces_per_question for _ in records],
        answers=[r.answer for r in records],
        columns=[{} for _ in records],
    )


def worker(spec: dict) -> dict:
    """In this (fresh) process: ``mode: time`` alternates SFT and each SSFT variant's steps on one
    model (so load from other processes hits all alike) and reports them; ``mode: sft`` or a variant
    name takes one step of that method only and reports this process's peak RSS."""
    import numpy as np
    import torch

    from forklight.modules.ssft import SSFTModule

    torch.manual_seed(0)
    model = MODELS[spec["model"]]
    model_config = dict(model["model_config"])
    if "n_positions" in model_config:  # the toy GPT's 256 learned positions: room for a long prompt too
        model_config["n_positions"] = max(model_config["n_positions"], spec.get("prompt_length", 0) + spec["trace_length"] + 32)
    module = SSFTModule(model_config=model_config, tokenizer="toy", num_fork_tokens=spec["N"],
                        match_prefix_tokens=spec["prefix"], matching="hungarian")
    module.configure_model()
    batch = synthetic_batch(module, spec["questions"], spec["M"], spec["trace_length"], seed=1,
                            prompt_length=spec.get("prompt_length", 0))
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    fixed = [np.arange(spec["M"]) % spec["N"] for _ in batch.trace_ids]  # SFT: trace j -> tag j
    defaults = {key: module.hparams[key] for options in VARIANTS.values() for key in options}

    def step(method: str) -> tuple[float, float, list]:
        """(step seconds, matching seconds) of one optimiser step."""
        module.hparams.update({**defaults, **VARIANTS.get(method, {})})
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        assignments = fixed if method == "sft" else module.match(batch)
        matched = time.perf_counter()
        loss, _ = module.matched_loss(batch, assignments)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started, matched - started

    if spec["mode"] != "time":
        step(spec["mode"])
        return {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    methods = ["sft", "ssft", *spec.get("variants", [])]
    samples: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}
    for repeat in range(spec["repeats"] + 1):  # the first of each is a warm-up
        for method in methods:
            samples[method].append(step(method))
    result = {"parameters": sum(p.numel() for p in module.model.parameters()), "threads": torch.get_num_threads(),
              "prompt_lengths": [len(p) for p in batch.prompt_ids]}
    assignments = {}  # of every method on the same (final) weights
    for method in methods[1:]:
        module.hparams.update({**defaults, **VARIANTS[method]})
        assignments[method] = [a.tolist() for a in module.match(batch)]
    for method, timed in samples.items():
        steps = [s for s, _ in timed[1:]]
        result[method] = {"step_s_min": min(steps), "step_s_median": statistics.median(steps),
                          "match_s_min": min(m for _, m in timed[1:]), "step_s_all": steps,
                          "agree": (float(np.mean([a == b for a, b in zip(assignments[method], assignments["ssft"])]))
                                    if method in assignments else None)}
    return result


def agreement(checkpoint: str, questions: int, prefixes: list[int | None]) -> list[dict]:
    """bf16 against fp32 cost forwards on a trained toy SSFT checkpoint: how often the matching agrees."""
    import numpy as np
    import torch

    from forklight.data.datamodule import ForkDataModule, ToyTask
    from forklight.matching import match_traces_to_tags
    from forklight.modules.ssft import SSFTModule

    hparams = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    data = ForkDataModule(toy=ToyTask(num_train=questions, num_val=1, num_test=1, seed=99), batch_size=8)
    data.setup("fit")
    batches = list(data.train_dataloader())
    results = []
    for prefix in prefixes:
        modules = {}
        for dtype in (None, "bfloat16"):
            modules[dtype] = SSFTModule(init_from=checkpoint, model_config=hparams["model_config"], tokenizer="toy",
                                        num_fork_tokens=hparams["num_fork_tokens"], match_prefix_tokens=prefix,
                                        match_dtype=dtype)
            modules[dtype].configure_model()
        same, traces_same, traces, regrets, differences = 0, 0, 0, [], []
        for batch in batches:
            for exact, fast in zip(modules[None].trace_tag_costs(batch), modules["bfloat16"].trace_tag_costs(batch)):
                a, b = match_traces_to_tags(exact, "hungarian"), match_traces_to_tags(fast, "hungarian")
                columns = np.arange(exact.shape[1])
                same += int(np.array_equal(a, b))
                traces_same, traces = traces_same + int((a == b).sum()), traces + len(a)
                regrets.append(float(exact[b, columns].sum() - exact[a, columns].sum()) / len(columns))
                differences.append(float(np.abs(exact - fast).max()))
        row = {"prefix": prefix, "questions": len(regrets), "question_agreement": same / len(regrets),
               "trace_agreement": traces_same / traces, "regret_per_trace_mean": float(np.mean(regrets)),
               "regret_per_trace_max": float(np.max(regrets)), "cost_abs_diff_max": float(np.max(differences))}
        results.append(row)
        print(f"prefix {'full' if prefix is None else prefix:>4}: bf16 matching == fp32 for {row['question_agreement']:.1%} "
              f"of {row['questions']} questions ({row['trace_agreement']:.1%} of traces); fp32-cost regret per trace "
              f"mean {row['regret_per_trace_mean']:.5f}, max {row['regret_per_trace_max']:.4f} nats; "
              f"max |C_bf16 - C_fp32| {row['cost_abs_diff_max']:.3f}", flush=True)
    return results


def run_in_subprocess(spec: dict) -> dict:
    """:func:`worker` on ``spec`` in a fresh ``python -m benchmarks.ssft_overhead --worker`` process."""
    command = [sys.executable, "-m", "benchmarks.ssft_overhead", "--worker", json.dumps(spec)]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[1]).stdout  # the repository root
    return json.loads(output.strip().splitlines()[-1])


def grid(full: bool, models: list[str], shapes: list[str] | None = None) -> list[dict]:
    """(model, N, M, prefix) configurations; prefix None = the whole trace."""
    if shapes is not None:
        chosen = [tuple(None if v == "full" else int(v) for v in shape.split(",")) for shape in shapes]
    configs = []
    for name in models:
        if shapes is not None:
            grid_shapes = chosen
        elif name == "toy" or full:
            grid_shapes = itertools.product((2, 6), (2, 4), (16, 128, None))
        else:  # quick: the target row only (N=6, M=4, prefix = a quarter of a 512-token trace)
            grid_shapes = [(6, 4, 128)]
        configs += [{"model": name, "N": n, "M": m, "prefix": p} for n, m, p in grid_shapes if m <= n]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole grid for the ~110M model too (slow on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per toy configuration (after one warm-up)")
    parser.add_argument("--big-repeats", type=int, default=1, help="timed steps per ~110M configuration")
    parser.add_argument("--big-trace-length", type=int, default=MODELS["llama-110m"]["trace_length"])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--prompt-length", type=int, default=0,
                        help="tokens of the first question's prompt, via a system prompt (0: the toy prompts, 8-16 tokens)")
    parser.add_argument("--variants", nargs="*", default=[], choices=[v for v in VARIANTS if v != "ssft"],
                        help="SSFT steps with other cost-matrix options, timed alongside the default one")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="N,M,PREFIX",
                        help="only these (N, M, match_prefix_tokens) shapes, e.g. 6,4,128 6,4,full")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS subprocesses")
    parser.add_argument("--agreement", default=None, metavar="CKPT",
                        help="instead: bf16 vs fp32 matching agreement on this trained toy SSFT checkpoint")
    parser.add_argument("--agreement-questions", type=int, default=400)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.agreement is not None:
        rows = agreement(args.agreement, args.agreement_questions, [1, 2, 16, None])
        write_results(f"{RESULTS}/ssft_match_dtype_agreement.json", {"checkpoint": args.agreement, "rows": rows})
        return

    rows = []
    header = (f"{'model':11s} {'N':>2s} {'M':>2s} {'L':>4s} {'prompt':>6s} {'prefix':>6s} {'variant':>13s} {'SFT s':>8s} "
              f"{'SSFT s':>8s} {'match s':>8s} {'time x':>7s} {'med x':>7s} {'agree':>5s} {'SFT MB':>7s} {'SSFT MB':>8s} "
              f"{'mem x':>6s}")
    print(header)
    for config in grid(args.full, args.models, args.shapes):
        model = MODELS[config["model"]]
        big = config["model"] != "toy"
        spec = {**config, "questions": model["questions"], "prompt_length": args.prompt_length,
                "trace_length": args.big_trace_length if big else model["trace_length"],
                "repeats": args.big_repeats if big else args.repeats}
        timed = run_in_subprocess({**spec, "mode": "time", "variants": args.variants})
        sft = timed["sft"]
        memory = {} if args.no_memory else {"sft": run_in_subprocess({**spec, "mode": "sft"})["peak_rss_mb"]}
        for variant in ["ssft", *args.variants]:
            ssft = timed[variant]
            if not args.no_memory:
                memory[variant] = run_in_subprocess({**spec, "mode": variant})["peak_rss_mb"]
            row = {**spec, "variant": variant, "options": VARIANTS[variant], "parameters": timed["parameters"],
                   "threads": timed["threads"], "prompt_lengths": timed["prompt_lengths"],
                   "sft": {**sft, "peak_rss_mb": memory.get("sft")}, "ssft": {**ssft, "peak_rss_mb": memory.get(variant)},
                   "time_ratio": ssft["step_s_min"] / sft["step_s_min"],
                   "time_ratio_median": ssft["step_s_median"] / sft["step_s_median"],
                   "memory_ratio": memory[variant] / memory["sft"] if memory else None}
            rows.append(row)
            prefix = "full" if config["prefix"] is None else str(config["prefix"])
            mem = (f"{memory['sft']:7.0f} {memory[variant]:8.0f} {row['memory_ratio']:6.2f}" if memory
                   else f"{'-':>7s} {'-':>8s} {'-':>6s}")
            print(f"{config['model']:11s} {config['N']:2d} {config['M']:2d} {spec['trace_length']:4d} "
                  f"{max(timed['prompt_lengths']):6d} {prefix:>6s} {variant:>13s} {sft['step_s_min']:8.3f} "
                  f"{ssft['step_s_min']:8.3f} {ssft['match_s_min']:8.3f} {row['time_ratio']:7.2f} "
                  f"{row['time_ratio_median']:7.2f} {ssft['agree']:5.2f} {mem}", flush=True)
    print(f"seconds: fastest of the timed steps; B questions per step: toy {MODELS['toy']['questions']}, llama-110m {MODELS['llama-110m']['questions']}; "
          f"prompt: the longest prompt's tokens; torch threads {rows[0]['threads']}; parameters: " +
          ", ".join(sorted({f"{r['model']} {r['parameters'] / 1e6:.1f}M" for r in rows})))
    suffix = "" if set(args.models) == set(MODELS) else "_" + "_".join(args.models)
    suffix += f"_prompt{args.prompt_length}" if args.prompt_length else ""
    write_results(f"{RESULTS}/ssft_overhead{suffix}.json", {"full": args.full, "models": args.models,
                                                            "prompt_length": args.prompt_length,
                                                            "variants": args.variants, "rows": rows})


if __name__ == "__main__":
    main()
