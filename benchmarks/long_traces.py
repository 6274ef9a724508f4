"""Long traces at real scale (issue 16): a 152k vocabulary without full-vocabulary logits, and packed loss rows.

    python -m benchmarks.long_traces                 # both tables (~11 minutes on 2 CPU cores)
    python -m benchmarks.long_traces --quick         # T in {512, 1024}, one timed step each: a smoke run
    OMP_NUM_THREADS=1 python -m benchmarks.long_traces --clock cpu   # on a CPU machine others are using too
    python -m benchmarks.long_traces --tables 2 --pack-lengths 8192 16384   # packing only, with longer rows
    python -m benchmarks.long_traces --tables 1 --lengths 512 --sides new --loss-chunk-tokens 128

Table 1, **one SSFT step at a 152,064-token vocabulary** (Qwen2.5's). A tiny Llama (hidden 64, 2 layers,
2 heads of 32, MLP 128, untied head: ~19.5M parameters, all but 0.1M of them the embedding and the head),
so that what grows with T x V is what a step costs. One question (B = 1), a 32-token prompt, M = 4 traces
of T tokens (random token ids below 152,064, end-of-turn last; forklight's toy tokenizer has few tokens, so
the ids are drawn directly and ``TraceSetBatch`` is built by hand), N = 6 fork tokens,
``match_prefix_tokens`` P = 1000 (the whole trace when shorter). A step = ``SSFTModule.match`` (the N*M
no-grad cost forwards and the Hungarian matching) + ``matched_loss`` forward/backward + an AdamW step.
Three sides for each T in ``--lengths``:

- ``full logits (before)``: ``SSFTModule(loss_head="full", pack_rows=False, match_chunk_rows=256)``: the
  model's ``[rows, T, V]`` logits in the cost forwards and in the loss, rows padded. It keeps
  ``match_chunk_tokens`` at its default (16,384 padded tokens per cost forward, which came with the new
  path): the code before issue 16 ran all 24 cost rows in one forward, 1.5x more logits at once than here
  for T >= 1000, so this side's memory understates "before";
- ``chunked + packed (new)``: the defaults: ``loss_head="auto"`` (Liger's fused loss on CUDA where it is
  installed, else the chunked head: the head applied to the scored positions only, ``loss_chunk_tokens``
  at a time, recomputed in backward) and ``pack_rows=True`` (``--loss-chunk-tokens`` sets that option);
- ``TRL SFTTrainer``: the same 4 rows ``[prompt | tag j | trace j]`` (labels -100 on prompt and tag), one
  optimiser step of TRL's own loop (its fused LM head; no matching: an SFT step on the same rows), AdamW,
  no clipping; skipped, saying why, when ``trl`` does not import.

Each (T, side) runs in its own fresh subprocess, one at a time: it builds the module and the optimiser,
takes one untimed warm-up step at T = 64 (AdamW's state is allocated and the module's probes run), reads
its ``VmRSS`` (``/proc/self/status``), takes the timed steps at T (3 at T = 512, 2 at 1024, 1 above;
``--repeats``), then reads its ``ru_maxrss``. **Peak memory** = that high-water mark minus the RSS
before the timed steps: what the step itself allocates (activations, logits, gradients), not the weights
or the optimiser state. **Step seconds** = the median of the timed steps (TRL: from the end of one
optimiser step to the end of the next, its data loading and collation included). A side whose predicted
peak exceeds ``--memory-limit-gb`` (default 18 of this machine's 24 GiB) is skipped and the table says so:
the full-logits side is predicted from its float32 logits, ``max(3 x the loss's [4, L, V], 1.1 x one cost
chunk's [rows, P, V])`` (the forward's logits, ``token_nll``'s shifted copy and the log-softmax kept for
backward are alive at once), the others by scaling their previous T's peak with the row length. Where the
full side is skipped, new/full is printed against its predicted peak (marked ``*``).
Ratios printed: peak memory new/full at every T (target <= 1/8 at T = 4096), new/TRL (target <= 1/2) and
step time new/full at T = 512 (target <= 1.15).

Table 2, **packing vs padding**. 32 traces whose lengths are drawn from a lognormal (median
``--median-length`` 768, sigma 1.0, seed 0) clipped to [64, 4096], after 32-token prompts, as 8 questions x 4
traces in one SSFT loss step with ``matching="fixed"`` (trace j -> tag j: no cost forwards), the same tiny
Llama with a 4096-token vocabulary (attention and MLP work dominate, not the head). ``pack_rows=True``
(``pack_length`` unset: rows as long as the longest sequence) against ``pack_rows=False`` (every sequence
padded to the longest), alternating in one subprocess (one warm-up step each, then ``--rounds`` rounds).
Reported: supervised (trace) tokens per second of forward + backward + AdamW step (median), the loss rows'
shape and their padding fraction (pad positions / all positions). Target: packed (default ``pack_length``)
>= 1.5x padded tokens/s; ``pack_length`` 8192 is measured too (``--pack-lengths``; none under ``--quick``).

Prints both tables and writes them to ``benchmarks/results/long_traces.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks.timing import (CLOCKS, RESULTS, add_clock_argument, count_supervised_tokens, peak_rss_mib, rss_mib,
                               write_results)

VOCAB = 152_064  # Qwen2.5's vocabulary
TINY_LLAMA = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 128, "tie_word_embeddings": False,
              "max_position_embeddings": 16384}
PROMPT_TOKENS, TRACES, TAGS, PREFIX = 32, 4, 6, 1000
WARMUP_LENGTH = 64  # trace tokens of the untimed first step of every worker
SIDES = {  # Table 1: SSFTModule options of each forklight side; "trl" is TRL's SFTTrainer
    "full": {"label": "full logits (before)",
             "options": {"loss_head": "full", "pack_rows": False, "match_chunk_rows": 256}},
    "new": {"label": "chunked + packed (new)", "options": {}},
    "trl": {"label": "TRL SFTTrainer", "options": None},
}
LENGTHS = [512, 1024, 2048, 4096]
REPEATS = {512: 3, 1024: 2}  # timed steps per Table 1 worker (1 at longer T; --repeats overrides)
PACK_TRACES, PACK_QUESTIONS, PACK_VOCAB, PACK_CLIP = 32, 8, 4096, (64, 4096)
GIB = 1024**3


# ---- memory --------------------------------------------------------------------------------------
def row_length(trace_length: int) -> int:
    return PROMPT_TOKENS + 1 + trace_length  # prompt | tag | trace


def predicted_full_gib(trace_length: int, chunk_tokens: int = 16384, chunk_rows: int = 256) -> float:
    """What the full-logits side's step adds, GiB: the larger of the loss's float32 logits (x3: the forward's
    ``[M, L, V]``, ``token_nll``'s shifted copy, the log-softmax kept for backward) and one cost chunk's logits
    (rows of ``tag | trace[:P-1]`` on the shared prompt's cache, as many as ``match_chunk_tokens`` allows)."""
    loss = 3 * TRACES * row_length(trace_length) * VOCAB * 4
    suffix = min(PREFIX, trace_length)
    rows = min(TAGS * TRACES, chunk_rows, max(1, chunk_tokens // (PROMPT_TOKENS + suffix)))
    cost = 1.1 * rows * suffix * VOCAB * 4
    return max(loss, cost) / GIB


# ---- batches -------------------------------------------------------------------------------------
def trace_batch(module, trace_lengths: list[list[int]], seed: int):
    """A TraceSetBatch of ``len(trace_lengths)`` questions, each a ``PROMPT_TOKENS``-token prompt and traces of the
    given lengths (end-of-turn last), all random ids between the tokenizer's last id and the model's vocabulary
    (never a special or fork token)."""
    import torch

    from forklight.data.rendering import TraceSetBatch

    generator = torch.Generator().manual_seed(seed)
    low, high, end_id = len(module.tokenizer), module.model.config.vocab_size, module.stop_ids[0]

    def ids(n: int) -> torch.Tensor:
        return torch.randint(low, high, (n,), generator=generator)

    questions = len(trace_lengths)
    return TraceSetBatch(
        ids=[f"q{q}" for q in range(questions)],
        prompt_ids=[ids(PROMPT_TOKENS) for _ in range(questions)],
        trace_ids=[[torch.cat([ids(length - 1), torch.tensor([end_id])]) for length in lengths]
                   for lengths in trace_lengths],
        sources=[[None] * len(lengths) for lengths in trace_lengths],
        answers=[None] * questions,
        columns=[{} for _ in range(questions)],
    )


def ssft_module(vocab: int, **options):
    import torch

    from forklight.modules.ssft import SSFTModule

    torch.manual_seed(0)
    module = SSFTModule(model_config={**TINY_LLAMA, "vocab_size": vocab}, tokenizer="toy", num_fork_tokens=TAGS,
                        match_prefix_tokens=PREFIX, learning_rate=1e-6, seed=0, **options)
    module.configure_model()
    return module


def trace_lengths(median: int, seed: int = 0) -> list[int]:
    """Table 2's ``PACK_TRACES`` trace lengths: lognormal (median ``median``, sigma 1), clipped to ``PACK_CLIP``."""
    import numpy as np

    draws = np.random.default_rng(seed).lognormal(mean=np.log(median), sigma=1.0, size=PACK_TRACES)
    return [int(v) for v in np.clip(np.round(draws), *PACK_CLIP)]


# ---- workers (each in a fresh process) -------------------------------------------------------------
def ssft_step_worker(spec: dict) -> dict:
    """Table 1, a forklight side: warm-up at ``WARMUP_LENGTH``, then the timed steps at T; times and peak growth."""
    import torch

    clock = CLOCKS[spec["clock"]]
    module = ssft_module(VOCAB, **spec["options"])
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    warmup = trace_batch(module, [[WARMUP_LENGTH] * TRACES], seed=2)
    batch = trace_batch(module, [[spec["T"]] * TRACES], seed=1)

    def step(work) -> tuple[float, float]:
        optimizer.zero_grad(set_to_none=True)
        started = clock()
        assignments = module.match(work)
        matched = clock()
        loss, _ = module.matched_loss(work, assignments)
        loss.backward()
        optimizer.step()
        return clock() - started, matched - started

    step(warmup)
    del warmup
    baseline = rss_mib()
    timed = [step(batch) for _ in range(spec["repeats"])]
    peak = peak_rss_mib()
    path = module.head_path()
    return {"step_s": statistics.median(s for s, _ in timed), "match_s": statistics.median(m for _, m in timed),
            "step_s_all": [s for s, _ in timed], "baseline_rss_mb": baseline, "peak_rss_mb": peak,
            "peak_growth_mb": peak - baseline, "threads": torch.get_num_threads(),
            "head": "liger" if path.liger else "chunked" if path.chunked else "full", "packed": module.packing(),
            "supervised_tokens": TRACES * spec["T"], "parameters": sum(p.numel() for p in module.model.parameters())}


def trl_step_worker(spec: dict) -> dict:
    """Table 1, TRL's side: ``SFTTrainer`` on the warm-up rows, then ``repeats`` steps on the 4 rows at T."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = CLOCKS[spec["clock"]]
    module = ssft_module(VOCAB)  # the same fresh weights and fork tokens as the forklight sides

    def rows(batch) -> list[dict]:  # trace j after tag j, as forklight's fixed assignment would
        out = []
        for prompt, traces in zip(batch.prompt_ids, batch.trace_ids):
            for j, trace in enumerate(traces):
                prefix = prompt.tolist() + [module.fork_token_ids[j % TAGS]]
                out.append({"input_ids": prefix + trace.tolist(), "labels": [-100] * len(prefix) + trace.tolist()})
        return out

    data = (rows(trace_batch(module, [[WARMUP_LENGTH] * TRACES], seed=2))
            + rows(trace_batch(module, [[spec["T"]] * TRACES], seed=1)) * spec["repeats"])

    class Probe(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.baseline: float | None = None

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.ends.append(clock())
            if state.global_step == 1:  # after the warm-up step: AdamW's state exists
                self.baseline = rss_mib()

    probe = Probe()
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="forklight-long-traces-"), per_device_train_batch_size=TRACES,
        max_steps=1 + spec["repeats"], learning_rate=1e-6, weight_decay=0.0, max_grad_norm=0.0, optim="adamw_torch",
        use_cpu=not torch.cuda.is_available(), max_length=None, train_sampling_strategy="sequential",
        dataloader_num_workers=0, logging_steps=10**6, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = SFTTrainer(model=module.model, args=args, train_dataset=Dataset.from_list(data),
                         processing_class=module.tokenizer, callbacks=[probe])
    trainer.remove_callback(PrinterCallback)
    supervised = count_supervised_tokens(trainer)
    trainer.train()
    peak = peak_rss_mib()
    steps = [b - a for a, b in zip(probe.ends, probe.ends[1:])]
    assert supervised[1 : 1 + spec["repeats"]] == [TRACES * spec["T"]] * spec["repeats"], supervised
    return {"step_s": statistics.median(steps), "match_s": None, "step_s_all": steps,
            "baseline_rss_mb": probe.baseline, "peak_rss_mb": peak, "peak_growth_mb": peak - probe.baseline,
            "threads": torch.get_num_threads(), "head": "trl fused", "packed": False,
            "supervised_tokens": TRACES * spec["T"]}


def packing_worker(spec: dict) -> dict:
    """Table 2: packed (each pack length) and padded loss steps alternating on one model, ``matching="fixed"``."""
    import torch

    from forklight.data.rendering import assemble_rows, pack_rows

    clock = CLOCKS[spec["clock"]]
    module = ssft_module(PACK_VOCAB, matching="fixed")
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    lengths = spec["lengths"]
    per_question = len(lengths) // PACK_QUESTIONS
    batch = trace_batch(module, [lengths[q * per_question : (q + 1) * per_question] for q in range(PACK_QUESTIONS)],
                        seed=3)
    supervised = sum(lengths)
    sides = {"padded": (False, None)}
    sides.update({f"packed {length or 'default'}": (True, length) for length in spec["pack_lengths"]})

    def step(name: str) -> float:
        module.hparams.pack_rows, module.hparams.pack_length = sides[name]
        module._packing = None  # probed again for this side (a cached "False" would pad every side) ...
        module.packing()  # ... before the clock starts
        optimizer.zero_grad(set_to_none=True)
        started = clock()
        loss, _ = module.matched_loss(batch, module.match(batch))
        loss.backward()
        optimizer.step()
        return clock() - started

    times: dict[str, list[float]] = {name: [] for name in sides}
    for round_index in range(1 + spec["repeats"]):  # the first round is a warm-up
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds = step(name)
            if round_index:
                times[name].append(seconds)
    prompts, tags, traces = [], [], []
    for prompt, question_traces, assignment in zip(batch.prompt_ids, batch.trace_ids, module.match(batch)):
        for trace, tag in zip(question_traces, assignment):
            prompts.append(prompt)
            tags.append(module.fork_token_ids[tag])
            traces.append(trace)
    real = sum(len(p) + 1 + len(t) for p, t in zip(prompts, traces))
    result = {"supervised_tokens": supervised, "real_tokens": real, "threads": torch.get_num_threads(), "sides": {}}
    pad = module.tokenizer.pad_token_id
    for name, (packed, pack_length) in sides.items():
        module.hparams.pack_rows, module._packing = packed, None
        packed = packed and module.packing()  # the rows matched_loss built
        rows = pack_rows(prompts, tags, traces, pad, pack_length) if packed else assemble_rows(prompts, tags, traces, pad)
        step_s = statistics.median(times[name])
        result["sides"][name] = {"pack_rows": sides[name][0], "pack_length": pack_length, "actually_packed": packed,
                                 "rows": list(rows.input_ids.shape), "padding_fraction": 1 - real / rows.input_ids.numel(),
                                 "step_s": step_s, "step_s_all": times[name], "tokens_per_s": supervised / step_s}
    return result


WORKERS = {"ssft": ssft_step_worker, "trl": trl_step_worker, "packing": packing_worker}


def run_worker(spec: dict) -> dict:
    """A worker in a fresh ``python -m benchmarks.long_traces --worker`` process; ``{"error": ...}`` if it fails."""
    command = [sys.executable, "-m", "benchmarks.long_traces", "--worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"worker exited with {done.returncode}: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- tables --------------------------------------------------------------------------------------
def trl_unavailable() -> str:
    """Why TRL's side cannot run here ("" when it can)."""
    try:
        import trl  # noqa: F401
    except Exception as error:  # noqa: BLE001
        return f"trl does not import ({error!r}): pip install trl"
    return ""


def table_one(args) -> list[dict]:
    why_no_trl = trl_unavailable()
    sides = [side for side in args.sides if side != "trl" or not why_no_trl]
    if "trl" in args.sides and why_no_trl:
        print(f"TRL side skipped: {why_no_trl}")
    limit_mb = args.memory_limit_gb * 1024
    rows, last = [], {}  # last: (T, peak growth MB) of each side's previous measured T
    print(f"\nTable 1: one SSFT step (match + loss + backward + AdamW), tiny Llama, V = {VOCAB}, B = 1, M = {TRACES}, "
          f"N = {TAGS}, P = {PREFIX}, prompt {PROMPT_TOKENS}", flush=True)
    print(f"{'T':>5s} {'side':24s} {'head':>8s} {'step s':>8s} {'match s':>8s} {'peak MB':>9s} {'pred MB':>8s}  steps",
          flush=True)
    for length in args.lengths:
        for side in sides:
            repeats = args.repeats or REPEATS.get(length, 1)
            if side == "full":
                predicted = predicted_full_gib(length) * 1024
            elif side in last:
                previous_length, previous_mb = last[side]
                predicted = previous_mb * row_length(length) / row_length(previous_length)
            else:
                predicted = None
            row = {"T": length, "side": side, "label": SIDES[side]["label"], "repeats": repeats,
                   "predicted_growth_mb": predicted}
            if predicted is not None and predicted > limit_mb:
                row["skipped"] = f"predicted peak {predicted / 1024:.1f} GiB > --memory-limit-gb {args.memory_limit_gb:g}"
                print(f"{length:5d} {SIDES[side]['label']:24s} skipped: {row['skipped']}", flush=True)
                rows.append(row)
                continue
            options = None if side == "trl" else {**SIDES[side]["options"], **(args.new_options if side == "new" else {})}
            row["options"] = options
            result = run_worker({"kind": "trl" if side == "trl" else "ssft", "side": side, "T": length,
                                 "options": options, "repeats": repeats, "clock": args.clock})
            row.update(result)
            rows.append(row)
            if "error" in result:
                print(f"{length:5d} {SIDES[side]['label']:24s} failed: {result['error']}", flush=True)
                continue
            last[side] = (length, result["peak_growth_mb"])
            match = "-" if result["match_s"] is None else f"{result['match_s']:8.2f}"
            pred = "-" if predicted is None else f"{predicted:8.0f}"
            print(f"{length:5d} {SIDES[side]['label']:24s} {result['head']:>8s} {result['step_s']:8.2f} {match:>8s} "
                  f"{result['peak_growth_mb']:9.0f} {pred:>8s}  {len(result['step_s_all'])}", flush=True)
    return rows


def ratios(rows: list[dict]) -> dict:
    """Per T: new/full and new/TRL peak memory and step time; where the full-logits side was skipped, new over its
    predicted peak (``memory_new_over_full_predicted``)."""
    by = {(r["T"], r["side"]): r for r in rows}
    out = {}
    for length in sorted({r["T"] for r in rows}):
        new, entry = by.get((length, "new"), {}), {}
        if "peak_growth_mb" not in new:
            out[length] = entry
            continue
        for other in ("full", "trl"):
            row = by.get((length, other), {})
            if "peak_growth_mb" in row:
                entry[f"memory_new_over_{other}"] = new["peak_growth_mb"] / row["peak_growth_mb"]
                entry[f"time_new_over_{other}"] = new["step_s"] / row["step_s"]
            elif other == "full" and row.get("skipped") and row.get("predicted_growth_mb"):
                entry["memory_new_over_full_predicted"] = new["peak_growth_mb"] / row["predicted_growth_mb"]
        out[length] = entry
    return out


def print_ratios(table: dict) -> dict:
    print("\nratios (peak = the step's RSS growth; new = chunked + packed; * = over the skipped full side's predicted peak)")
    print(f"{'T':>5s} {'mem new/full':>12s} {'mem new/TRL':>11s} {'time new/full':>13s} {'time new/TRL':>12s}")

    def cell(value, width, mark=""):
        return f"{value:{width - len(mark)}.3f}{mark}" if value is not None else f"{'-':>{width}s}"

    for length, entry in table.items():
        full = cell(entry.get("memory_new_over_full"), 12) if "memory_new_over_full" in entry else cell(
            entry.get("memory_new_over_full_predicted"), 12, "*")
        print(f"{length:5d} {full} {cell(entry.get('memory_new_over_trl'), 11)} "
              f"{cell(entry.get('time_new_over_full'), 13)} {cell(entry.get('time_new_over_trl'), 12)}")
    at_4096 = table.get(4096, {})
    targets = {}
    if "memory_new_over_full" in at_4096:
        targets["memory new/full <= 1/8 at T=4096"] = "met" if at_4096["memory_new_over_full"] <= 1 / 8 else "MISSED"
    elif "memory_new_over_full_predicted" in at_4096:
        ratio = at_4096["memory_new_over_full_predicted"]
        targets["memory new/full <= 1/8 at T=4096"] = (f"{'met' if ratio <= 1 / 8 else 'MISSED'} against the predicted "
                                                       f"full-logits peak ({ratio:.3f}; full logits not run)")
    else:
        targets["memory new/full <= 1/8 at T=4096"] = "not measured"
    trl = {length: e["memory_new_over_trl"] for length, e in table.items() if "memory_new_over_trl" in e}
    targets["memory new/TRL <= 1/2"] = (
        ", ".join(f"T={length} {'met' if v <= 0.5 else 'MISSED'} ({v:.2f})" for length, v in trl.items()) or "not measured")
    time_512 = table.get(512, {}).get("time_new_over_full")
    targets["time new/full <= 1.15 at T=512"] = (
        "not measured" if time_512 is None else f"{'met' if time_512 <= 1.15 else 'MISSED'} ({time_512:.2f})")
    for name, verdict in targets.items():
        print(f"target {name}: {verdict}")
    return targets


def table_two(args) -> dict:
    lengths = trace_lengths(args.median_length)
    pack_lengths = [None] + [length for length in args.pack_lengths if length is not None]
    print(f"\nTable 2: packing vs padding, one SSFT loss step (matching fixed) of {PACK_QUESTIONS} questions x "
          f"{PACK_TRACES // PACK_QUESTIONS} traces, tiny Llama, V = {PACK_VOCAB}; trace lengths lognormal (median "
          f"{args.median_length}, sigma 1, seed 0) clipped to {list(PACK_CLIP)}: min {min(lengths)}, median "
          f"{statistics.median(lengths):.0f}, max {max(lengths)}, sum {sum(lengths)}", flush=True)
    spec = {"kind": "packing", "lengths": lengths, "pack_lengths": pack_lengths, "repeats": args.rounds,
            "clock": args.clock}
    result = run_worker(spec)
    if "error" in result:
        print(f"failed: {result['error']}")
        return {"lengths": lengths, **result}
    print_table_two(result)
    return {"lengths": lengths, **result}


def print_table_two(result: dict) -> None:
    padded = result["sides"]["padded"]["tokens_per_s"]
    print(f"{'side':16s} {'rows x length':>13s} {'padding':>8s} {'step s':>8s} {'tokens/s':>9s} {'vs padded':>9s}")
    for name, side in result["sides"].items():
        print(f"{name:16s} {side['rows'][0]:>5d} x {side['rows'][1]:<5d} {side['padding_fraction']:8.1%} "
              f"{side['step_s']:8.2f} {side['tokens_per_s']:9.0f} {side['tokens_per_s'] / padded:8.2f}x"
              + ("" if side["actually_packed"] or not side["pack_rows"] else "  (padded: packing refused)"))
    best = max(side["tokens_per_s"] for name, side in result["sides"].items() if name != "padded")
    default = result["sides"]["packed default"]["tokens_per_s"]
    print(f"target packed tokens/s >= 1.5x padded: default pack_length {default / padded:.2f}x "
          f"({'met' if default >= 1.5 * padded else 'MISSED'}); best pack_length {best / padded:.2f}x "
          f"({'met' if best >= 1.5 * padded else 'MISSED'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T in {512, 1024}, one timed step each (a smoke run)")
    parser.add_argument("--tables", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS, help="Table 1's trace lengths T")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES), help="Table 1's sides")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed steps of every Table 1 worker (default 3 at T = 512, 2 at 1024, 1 above)")
    parser.add_argument("--rounds", type=int, default=5, help="Table 2's timed rounds (each side once per round)")
    parser.add_argument("--memory-limit-gb", type=float, default=18.0,
                        help="skip a side whose predicted peak growth exceeds this many GiB")
    parser.add_argument("--median-length", type=int, default=768, help="Table 2's lognormal median trace length")
    parser.add_argument("--pack-lengths", type=int, nargs="*", default=None,
                        help="Table 2: pack_length values measured besides the default one (default 8192; none "
                             "under --quick)")
    parser.add_argument("--loss-chunk-tokens", type=int, default=None,
                        help="the new side's loss_chunk_tokens (default: SSFTModule's, 512)")
    add_clock_argument(parser, help="wall time (default) or this process's CPU time: on a shared CPU-only machine run "
                                    "with OMP_NUM_THREADS=1 and --clock cpu (meaningless on a GPU)")
    parser.add_argument("--output", default=f"{RESULTS}/long_traces.json", help="where the JSON goes")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        from benchmarks.timing import quiet

        quiet()
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return
    if args.pack_lengths is None:
        args.pack_lengths = [] if args.quick else [8192]
    args.new_options = {} if args.loss_chunk_tokens is None else {"loss_chunk_tokens": args.loss_chunk_tokens}
    if args.quick:
        args.lengths, args.repeats, args.rounds = [t for t in args.lengths if t <= 1024] or [512], 1, 1
    import torch

    print(f"long traces (torch {torch.__version__}; threads {torch.get_num_threads()}, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}; {args.clock} clock; each run in a fresh subprocess, one at a time)",
          flush=True)
    record: dict = {"quick": args.quick, "clock": args.clock, "threads": torch.get_num_threads(),
                    "torch": torch.__version__, "model_config": TINY_LLAMA}
    if 1 in args.tables:
        rows = table_one(args)
        table = ratios(rows)
        record["table1"] = {"vocab_size": VOCAB, "questions": 1, "traces": TRACES, "fork_tokens": TAGS,
                            "match_prefix_tokens": PREFIX, "prompt_tokens": PROMPT_TOKENS,
                            "memory_limit_gb": args.memory_limit_gb, "new_options": args.new_options, "rows": rows,
                            "ratios": {str(k): v for k, v in table.items()}, "targets": print_ratios(table)}
    if 2 in args.tables:
        record["table2"] = {"vocab_size": PACK_VOCAB, "questions": PACK_QUESTIONS, **table_two(args)}
    write_results(args.output, record)


if __name__ == "__main__":
    main()
