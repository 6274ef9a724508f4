"""What every benchmark times with: clocks, medians of repeated runs, per-step timers for the
Lightning and the transformers training loops, alternating sides, host memory readings, and the results file.

A clock is passed to whatever measures (``clock=``), never set globally: ``wall`` is
``time.perf_counter``; ``cpu`` is this process's CPU time summed over its threads, a proxy that
other processes' load hardly moves on a shared CPU-only machine (meaningless on a GPU).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable

import torch

Clock = Callable[[], float]
CLOCKS: dict[str, Clock] = {"wall": time.perf_counter, "cpu": time.process_time}
RESULTS = "benchmarks/results"  # relative to the repository root, where the benchmarks run


def add_clock_argument(parser, help: str) -> None:
    """``--clock wall|cpu``; read it back with ``CLOCKS[args.clock]``."""
    parser.add_argument("--clock", default="wall", choices=list(CLOCKS), help=help)


def child_environment(repository: str, **variables: str) -> dict[str, str]:
    """This process's environment for a child run in ``repository``: the repository first on ``PYTHONPATH``
    (what was there stays after it, e.g. carried wheels), plus ``variables``."""
    path = os.pathsep.join(filter(None, [repository, os.environ.get("PYTHONPATH")]))
    return {**os.environ, **variables, "PYTHONPATH": path}


def rss_mib() -> float:
    """This process's resident memory now (``VmRSS``), MiB."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mib() -> float:
    """This process's resident-memory high-water mark (``ru_maxrss``: KiB on Linux), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize() -> None:
    """Wait for queued GPU work, so that a clock read after it counts it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def release() -> None:
    """Free what the last run left (between runs, so one side's garbage does not slow the next)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def median_seconds(work: Callable[[], object], repeats: int, clock: Clock = time.perf_counter) -> float:
    """Median seconds of ``repeats`` calls of ``work``, after one untimed warm-up call."""
    times = []
    for _ in range(repeats + 1):
        synchronize()
        started = clock()
        work()
        synchronize()
        times.append(clock() - started)
    return statistics.median(times[1:])


def median_of_runs(runs: list[dict], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def fastest_step(runs: list[dict]) -> float:
    """The fastest timed step of all runs: what a side does when nothing else competes for the machine."""
    return min(min(run["step_s_all"]) for run in runs)


def alternate(sides: dict[str, Callable[..., dict]], repeats: int, warmup_runs: int = 1) -> dict[str, list[dict]]:
    """Run every side ``warmup_runs`` times (discarded), then ``repeats`` rounds alternating them, so
    that load from other processes hits all sides alike. ``sides[name](warmup=...)`` returns a run's dict."""
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    for round_index in range(warmup_runs + repeats):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))  # who goes first alternates too
        for name in order:
            result = sides[name](warmup=round_index < warmup_runs)
            release()
            if round_index >= warmup_runs:
                runs[name].append(result)
                print(f"    {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in result.items() if isinstance(v, float)),
                      flush=True)
    return runs


# ---- per-step timers of the two training loops ---------------------------------------------------
def lightning_step_timer(clock: Clock):
    """Lightning callback: ``clock()`` at the end of every training batch (each is one optimiser step),
    with the batch's question ids and supervised (trace) tokens."""
    import lightning as L

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.batch_ids: list[list[str]] = []
            self.supervised: list[int] = []

        def on_train_start(self, trainer, pl_module) -> None:
            synchronize()
            self.start = clock()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            synchronize()
            self.ends.append(clock())
            self.batch_ids.append(list(batch.ids))
            self.supervised.append(sum(len(trace) for traces in batch.trace_ids for trace in traces))

    return StepTimer()


def hf_step_timer(clock: Clock):
    """transformers ``TrainerCallback``: ``clock()`` at the end of every optimiser step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs) -> None:
            synchronize()
            self.start = clock()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            synchronize()
            self.ends.append(clock())

    return StepTimer()


def step_seconds(timer, warmup_steps: int) -> list[float]:
    """Seconds of each optimiser step after the first ``warmup_steps`` (end of step k-1 to end of step k)."""
    ends = [timer.start] + timer.ends
    return [b - a for a, b in zip(ends, ends[1:])][warmup_steps:]


def count_supervised_tokens(trainer) -> list[int]:
    """Wrap a transformers ``Trainer``'s collator so that every batch's supervised tokens (labels != -100) are
    appended to the returned list as the trainer collates them."""
    supervised: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        supervised.append(int((batch["labels"] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    return supervised


# ---- output --------------------------------------------------------------------------------------
def quiet() -> None:
    """Keep the tables readable: no per-run banners, progress bars or library warnings."""
    import lightning  # noqa: F401  (its loggers are configured on import: import first, then quieten)
    import transformers

    for name in ("lightning.pytorch", "lightning.fabric", "forklight", "transformers", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def write_results(path: str, record: dict, note: str = "") -> None:
    """``record`` as indented JSON at ``path`` (directories made), then ``wrote <path><note>``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2)
    print(f"wrote {path}{note}")
