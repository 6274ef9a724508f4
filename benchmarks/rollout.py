"""Rollout throughput: forklight's batched engine vs one ``model.generate`` call per sample.

    python -m benchmarks.rollout                      # toy model, fresh weights, B=2 questions
    python -m benchmarks.rollout --questions 8 --group-sizes 4 8 16 32

For each group size G, builds the B*G prefixes (toy prompt + a fork tag, tags cycling) and samples
``--max-new-tokens`` tokens after each, twice, side by side in this process:

- engine: one ``forklight.rollout.generate_completions`` call (all B*G prefixes in one left-padded
  ``generate`` with the KV cache);
- per sample: the same function with ``batch_size=1``, i.e. one ``generate`` call per prefix.

Neither stops early: the only stop id is the end-of-sequence token, which is also suppressed, so
every completion has exactly ``--max-new-tokens`` tokens and both generate the same count. Prints
generated tokens/s and the ratio engine / per sample (target >= 4x at G = 8); writes
``benchmarks/results/rollout.json``.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.timing import RESULTS, write_results
from benchmarks.workloads import TOY_MODEL


def timed_generation(module, prefixes: list[list[int]], max_new_tokens: int, batch_size: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one generate_completions call."""
    from forklight.rollout import generate_completions

    never = [module.tokenizer.eos_token_id]  # stop id that is also suppressed: no completion ends early
    started = time.perf_counter()
    completions = generate_completions(module.model, module.tokenizer, prefixes, stop_ids=never,
                                       max_new_tokens=max_new_tokens, temperature=1.0, batch_size=batch_size,
                                       suppress_ids=never)
    seconds = time.perf_counter() - started
    return seconds, sum(c.length for c in completions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=2, help="B, questions")
    parser.add_argument("--group-sizes", type=int, nargs="+", default=[4, 8, 16], help="G values")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)

    from forklight.data.rendering import render_prompt_ids
    from forklight.data.toy import generate_toy_records
    from forklight.modules.ssft import SSFTModule

    module = SSFTModule(model_config=TOY_MODEL, tokenizer="toy")
    module.configure_model()
    prompts = [render_prompt_ids(module.tokenizer, r) for r in generate_toy_records(args.questions, seed=7)]
    tags = module.fork_token_ids
    timed_generation(module, [prompts[0] + [tags[0]]] * 4, 8, batch_size=4)  # warm-up

    rows = []
    print(f"toy model, fresh weights; B={args.questions} questions, {args.max_new_tokens} new tokens each; "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'G':>3s} {'B*G':>4s} {'tokens':>7s} {'engine s':>9s} {'engine tok/s':>13s} "
          f"{'per-sample s':>13s} {'per-sample tok/s':>17s} {'ratio':>6s}")
    for group_size in args.group_sizes:
        prefixes = [prompt + [tags[g % len(tags)]] for prompt in prompts for g in range(group_size)]  # [B*G]
        engine_s, engine_tokens = timed_generation(module, prefixes, args.max_new_tokens, batch_size=len(prefixes))
        single_s, single_tokens = timed_generation(module, prefixes, args.max_new_tokens, batch_size=1)
        assert engine_tokens == single_tokens == len(prefixes) * args.max_new_tokens, (engine_tokens, single_tokens)
        row = {"group_size": group_size, "prefixes": len(prefixes), "tokens": engine_tokens,
               "engine_s": engine_s, "engine_tokens_per_s": engine_tokens / engine_s,
               "per_sample_s": single_s, "per_sample_tokens_per_s": single_tokens / single_s,
               "ratio": single_s / engine_s}
        rows.append(row)
        print(f"{group_size:3d} {len(prefixes):4d} {engine_tokens:7d} {engine_s:9.3f} {row['engine_tokens_per_s']:13.0f} "
              f"{single_s:13.3f} {row['per_sample_tokens_per_s']:17.0f} {row['ratio']:6.1f}", flush=True)
    write_results(f"{RESULTS}/rollout.json", {"questions": args.questions, "max_new_tokens": args.max_new_tokens,
                                              "threads": torch.get_num_threads(), "rows": rows},
                  note=" (ratio = engine tokens/s / per-sample tokens/s; target >= 4 at G = 8)")


if __name__ == "__main__":
    main()
