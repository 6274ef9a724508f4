"""GFPO vs GRPO: the cost of one update on the same rollouts, and where a GFPO step's time goes.

    python -m benchmarks.rl_update_cost                       # toy model (newest SSFT export, else fresh)
    python -m benchmarks.rl_update_cost --init-from runs/ssft/version_0/export --questions 16 --group-size 12

Generates one batch of rollouts (B questions x G completions) once, then times, side by side in
this process, an optimiser step of each method on exactly those rollouts:

- GFPO: one forward + backward over the B prompts (the tag policy), ``trainable: head`` and ``all``;
- GRPO: one forward + backward over all B*G (prompt + tag + completion) rows.

Prints seconds (median of ``--repeats``) and the ratios GFPO/GRPO (target <= 0.1), and the share of
a GFPO step and of a GRPO step spent generating (rollouts + rewards) versus updating: on identical
rollouts both pay the same generation, so a step is that generation plus the method's update (for
GRPO also the assembly of its B*G training rows, counted with the update); writes the same numbers
to ``benchmarks/results/rl_update_cost.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.timing import RESULTS, median_seconds, write_results
from benchmarks.workloads import starting_point


def timed_update(module, update, repeats: int) -> float:
    """Median seconds of one optimiser step (loss, backward, step) on fixed prepared rollouts (``prepare_update``)."""
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        module.update_loss(update, 0).loss.backward()
        optimizer.step()

    return median_seconds(step, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init-from", default=None, help="forklight export or .ckpt (default: newest toy SSFT export)")
    parser.add_argument("--questions", type=int, default=16, help="B, questions per step")
    parser.add_argument("--group-size", type=int, default=12, help="G, completions per question")
    parser.add_argument("--max-completion-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)

    from forklight.data.toy import generate_toy_records
    from forklight.modules.gfpo import GFPOModule
    from forklight.modules.grpo import GRPOModule
    from forklight.data.rendering import TraceSetBatch, render_prompt_ids
    from forklight.starting import resolve_init_from

    start = starting_point(args.init_from)
    common = {"init_from": start, "group_size": args.group_size, "max_completion_tokens": args.max_completion_tokens,
              "num_fork_tokens": resolve_init_from(start).identity.get("num_fork_tokens", 6)}
    gfpo = GFPOModule(**common, trainable="head")
    gfpo.configure_model()
    records = generate_toy_records(args.questions, seed=7)
    batch = TraceSetBatch(
        ids=[r.id for r in records],
        prompt_ids=[torch.tensor(render_prompt_ids(gfpo.tokenizer, r)) for r in records],
        trace_ids=[[] for _ in records], sources=[[] for _ in records], answers=[r.answer for r in records],
        columns=[{} for _ in records],
    )

    gfpo.log = lambda *a, **k: None  # no trainer here: metrics are not recorded
    started = time.perf_counter()
    update = gfpo.prepare_update(batch, 0)  # generate + score (the part every RL method pays)
    generate_s = time.perf_counter() - started
    groups = gfpo.rollouts(batch, update.tags.tolist(), 0)  # the same rollouts, reused below
    rollout_tokens = sum(c.length for g in groups for c in g.completions)

    results = {"GFPO update (trainable: head)": timed_update(gfpo, update, args.repeats)}
    gfpo_all = GFPOModule(**common, trainable="all")
    gfpo_all.configure_model()
    results["GFPO update (trainable: all)"] = timed_update(gfpo_all, update, args.repeats)

    grpo = GRPOModule(**common)
    grpo.configure_model()
    grpo.log = lambda *a, **k: None
    grpo.rollouts = lambda batch, tags, batch_idx: groups
    started = time.perf_counter()
    grpo_update = grpo.prepare_update(batch, 0)  # rewards again + the B*G rows (no generation: rollouts reused)
    grpo_rows_s = time.perf_counter() - started
    results["GRPO update (all completion tokens)"] = timed_update(grpo, grpo_update, args.repeats)

    grpo_s = results["GRPO update (all completion tokens)"]
    print(f"start: {start}; B={args.questions} questions x G={args.group_size} completions, "
          f"{rollout_tokens} completion tokens; torch threads {torch.get_num_threads()}")
    print(f"{'what':40s} {'seconds':>9s} {'/ GRPO':>8s}")
    for name, seconds in results.items():
        print(f"{name:40s} {seconds:9.4f} {seconds / grpo_s:8.3f}")
    head_s = results["GFPO update (trainable: head)"]
    print(f"{'generate + score (one step of rollouts)':40s} {generate_s:9.4f}")
    record = {"start": start, "questions": args.questions, "group_size": args.group_size,
              "completion_tokens": rollout_tokens, "threads": torch.get_num_threads(), "generate_s": generate_s,
              "update_s": results, "gfpo_over_grpo": head_s / grpo_s, "gfpo_generate_share": generate_s / (generate_s + head_s),
              "grpo_prepare_s": grpo_rows_s,
              "grpo_generate_share": generate_s / (generate_s + grpo_rows_s + grpo_s),
              "gfpo_step_over_grpo_step": (generate_s + head_s) / (generate_s + grpo_rows_s + grpo_s)}
    print(f"GFPO step: {generate_s / (generate_s + head_s):.1%} generating, {head_s / (generate_s + head_s):.1%} updating "
          f"(trainable: head); GFPO/GRPO update ratio {head_s / grpo_s:.3f} (target <= 0.1)")
    grpo_step_s = generate_s + grpo_rows_s + grpo_s
    print(f"GRPO step: {generate_s / grpo_step_s:.1%} generating, {(grpo_rows_s + grpo_s) / grpo_step_s:.1%} updating "
          f"(rows {grpo_rows_s:.4f} s + update {grpo_s:.4f} s); whole step GFPO/GRPO "
          f"{(generate_s + head_s) / grpo_step_s:.3f} on identical rollouts")
    write_results(f"{RESULTS}/rl_update_cost.json", record)


if __name__ == "__main__":
    main()
