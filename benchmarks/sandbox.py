"""Code sandbox throughput: programs per second through the pool vs one sandboxed subprocess at a time.

    python -m benchmarks.sandbox                     # 64 programs, pools of 2, 4 and 8
    python -m benchmarks.sandbox --programs 256 --workers 4 16 32

The same batch of small programs (each reads two integers and prints their sum, like a one-test submission) runs,
side by side in this process, as:

- bare subprocess: ``python -I -S`` per program, one at a time, no sandbox (what the sandbox adds is the rest);
- sandbox, one at a time: :meth:`forklight.rewards.sandbox.Sandbox.run` in a loop;
- sandbox pool: :meth:`~forklight.rewards.sandbox.Sandbox.run_many` with ``workers`` launchers at once;
- code verifier: :class:`forklight.rewards.CodeVerifier` on completions holding the program, 3 tests each (the
  test runner forks per test), through its default pool.

Each is timed ``--repeats`` times (median, after a warm-up). Prints programs/s and the ratio to one sandboxed
subprocess at a time; writes ``benchmarks/results/sandbox.json``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from benchmarks.timing import RESULTS, median_seconds, write_results

PROGRAM = "a, b = map(int, input().split())\nprint(a + b)\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=64, help="programs per timed batch")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8], help="pool sizes")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from forklight.rewards import CodeVerifier
    from forklight.rewards.sandbox import Sandbox, SandboxJob

    stdins = [f"{i} {i + 1}\n".encode() for i in range(args.programs)]
    jobs = [SandboxJob(PROGRAM, stdin) for stdin in stdins]

    def bare() -> None:
        for stdin in stdins:
            subprocess.run([sys.executable, "-I", "-S", "-c", PROGRAM], input=stdin, capture_output=True, check=True)

    def serial(sandbox: Sandbox) -> None:
        results = [sandbox.run(job.program, job.stdin) for job in jobs]
        assert all(r.ok for r in results), next(r for r in results if not r.ok)

    def pooled(sandbox: Sandbox) -> None:
        results = sandbox.run_many(jobs)
        assert all(r.ok for r in results), next(r for r in results if not r.ok)

    verifier = CodeVerifier(test_timeout_s=6.0)
    tests = [{"input": f"{i} {i + 1}", "output": str(2 * i + 1)} for i in range(3)]
    completions = [f"```python\n{PROGRAM}```"] * args.programs

    def verified() -> None:
        assert verifier(completions, [None] * args.programs, tests=[tests] * args.programs) == [1.0] * args.programs

    one_at_a_time = Sandbox(workers=1)
    sides = {"bare subprocess, one at a time": (bare, None),
             "sandbox, one at a time": (lambda: serial(one_at_a_time), 1)}
    pools = {workers: Sandbox(workers=workers) for workers in args.workers}
    for workers, sandbox in pools.items():
        sides[f"sandbox pool, {workers} workers"] = (lambda sandbox=sandbox: pooled(sandbox), workers)
    sides[f"code verifier, 3 tests, {verifier.sandbox.workers} workers"] = (verified, verifier.sandbox.workers)

    print(f"{args.programs} programs per batch, median of {args.repeats}; {os.cpu_count()} CPUs; python {sys.version.split()[0]}")
    print(f"{'side':44s} {'workers':>7s} {'seconds':>8s} {'programs/s':>11s} {'vs one at a time':>17s}")
    rows = []
    for name, (work, workers) in sides.items():
        seconds = median_seconds(work, args.repeats)
        rows.append({"side": name, "workers": workers or 1, "seconds": seconds, "programs_per_s": args.programs / seconds})
    reference = next(row["programs_per_s"] for row in rows if row["side"] == "sandbox, one at a time")
    for row in rows:
        row["ratio"] = row["programs_per_s"] / reference
        print(f"{row['side']:44s} {row['workers']:7d} {row['seconds']:8.2f} {row['programs_per_s']:11.1f} "
              f"{row['ratio']:16.2f}x", flush=True)
    for sandbox in [one_at_a_time, *pools.values(), verifier.sandbox]:
        sandbox.close()
    write_results(f"{RESULTS}/sandbox.json", {"programs": args.programs, "repeats": args.repeats,
                                              "cpus": os.cpu_count(), "rows": rows},
                  note=" (ratio = programs/s / those of one sandboxed subprocess at a time)")


if __name__ == "__main__":
    main()
