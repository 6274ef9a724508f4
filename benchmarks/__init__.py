"""Ratio benchmarks (not tests): each prints a table of times and ratios measured side by side in
one run and writes the same numbers to ``benchmarks/results/<name>.json``. Run them from the
repository root as modules:

    python -m benchmarks.ssft_overhead      # SSFT vs plain SFT: step time and peak memory
    python -m benchmarks.rl_update_cost     # GFPO vs GRPO: one update on the same rollouts
    python -m benchmarks.rollout            # batched rollout engine vs one generate call per sample
    python -m benchmarks.vs_trl             # forklight vs TRL (pip install trl, or forklight[bench])
    python -m benchmarks.mfu                # model FLOP utilisation of SFT training

``timing`` holds the clocks, medians and result files they share, ``workloads`` the models and
data they run; every script's ``--help`` gives its flags and the exact protocol.
"""
