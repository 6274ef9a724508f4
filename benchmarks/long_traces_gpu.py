"""The long-trace SSFT step on a GPU (issue 16's GPU check): a Qwen2.5-0.5B-shaped model, 152k vocabulary, T = 16k.

    python -m benchmarks.long_traces_gpu                      # full, chunked (PyTorch's fused sum), liger if installed
    python -m benchmarks.long_traces_gpu --length 4096 --sides chunked liger
    python -m benchmarks.long_traces_gpu --device cpu --architecture tiny --length 256   # a smoke run, no GPU

One SSFT step as in ``benchmarks.long_traces`` Table 1 (B = 1, a 32-token prompt, M = 4 random traces of
``--length`` tokens, N = 6 tags, P = 1000: ``match`` + ``matched_loss`` forward/backward + AdamW) on fresh
weights of Qwen2.5-0.5B's shape (``benchmarks.engines.ARCHITECTURES``, vocabulary 152,064, tied head; no hub
access needed), bf16 weights, ``gradient_checkpointing``, packed rows, sdpa. Sides, each in its own process:

- ``full``: ``loss_head: full`` (the model's ``[4, L, V]`` logits; expected out of memory at T = 16k: ~10^10
  float32 logits);
- ``chunked``: ``loss_head: chunked``: the head on the scored positions only, the sum fused in PyTorch;
- ``liger``: ``loss_head: liger`` (``pip install liger-kernel``), skipped saying why where it cannot run.

Prints, per side, the peak GPU memory (``torch.cuda.max_memory_allocated`` over the timed step, weights and
AdamW state included) and supervised tokens per second (median of ``--repeats`` steps after one warm-up);
a side that runs out of memory says so. Needs CUDA (``--device cpu`` with ``--architecture tiny``, the CPU
table's tiny Llama, only checks that the script runs); CI never runs it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

from benchmarks.long_traces import PREFIX, TAGS, TINY_LLAMA, TRACES, trace_batch

SIDES = ("full", "chunked", "liger")


def worker(side: str, length: int, repeats: int, architecture: str, device: str) -> dict:
    import torch
    from lightning.fabric.utilities.apply_func import move_data_to_device

    from benchmarks.engines import ARCHITECTURES
    from forklight.errors import ConfigError
    from forklight.modules.ssft import SSFTModule

    torch.manual_seed(0)
    shape = TINY_LLAMA if architecture == "tiny" else ARCHITECTURES[architecture]
    config = {**shape, "vocab_size": 152_064, "max_position_embeddings": max(32768, length + 64)}
    cuda = device == "cuda"
    synchronize = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        module = SSFTModule(model_config=config, tokenizer="toy", num_fork_tokens=TAGS, match_prefix_tokens=PREFIX,
                            dtype="bfloat16", gradient_checkpointing=True, attn_implementation="sdpa", loss_head=side,
                            learning_rate=1e-6, seed=0)
        module.configure_model()
        module.to(device)
        module.head_path()  # liger refused here, with why
    except ConfigError as error:
        return {"side": side, "skipped": str(error)}
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-6)
    batch = move_data_to_device(trace_batch(module, [[length] * TRACES], seed=1), torch.device(device))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        synchronize()
        started = time.perf_counter()
        loss, _ = module.matched_loss(batch, module.match(batch))
        loss.backward()
        optimizer.step()
        synchronize()
        return time.perf_counter() - started

    try:
        step()  # warm-up: AdamW's state, kernels
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = statistics.median(step() for _ in range(repeats))
    except torch.OutOfMemoryError as error:
        return {"side": side, "out_of_memory": str(error).splitlines()[0]}
    return {"side": side, "step_s": seconds, "tokens_per_s": TRACES * length / seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 1024**3 if cuda else float("nan"),
            "parameters": sum(p.numel() for p in module.model.parameters()),
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=16384, help="trace tokens T (4 traces)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--architecture", default="qwen2.5-0.5b", choices=["qwen2.5-0.5b", "qwen2.5-1.5b", "tiny"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.length, args.repeats, args.architecture, args.device)))
        return
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("benchmarks.long_traces_gpu needs CUDA: the CPU tables are python -m benchmarks.long_traces")
    rows = []
    for side in args.sides:
        done = subprocess.run([sys.executable, "-m", "benchmarks.long_traces_gpu", "--worker", side, "--length",
                               str(args.length), "--repeats", str(args.repeats), "--architecture", args.architecture,
                               "--device", args.device],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        rows.append(json.loads(lines[-1][7:]) if lines else {"side": side, "failed": done.stderr[-2000:]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.architecture}, vocabulary 152,064, B = 1, M = {TRACES}, T = {args.length}, bf16, checkpointing")
    print(f"{'side':10} {'peak GiB':>9} {'tokens/s':>10}")
    for row in rows:
        if "step_s" in row:
            print(f"{row['side']:10} {row['peak_gib']:9.1f} {row['tokens_per_s']:10.0f}")
        else:
            why = row.get("out_of_memory") or row.get("skipped") or row.get("failed", "")[-200:]
            print(f"{row['side']:10} {'-':>9} {'-':>10}  {why}")


if __name__ == "__main__":
    main()
