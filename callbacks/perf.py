"""``PerfMonitor``: throughput, model FLOP utilisation and peak memory of the training steps.

Every ``every_n_steps`` optimiser steps (default: the trainer's ``log_every_n_steps``), over the
training batches of that window (validation excluded):

- ``perf/step_s/train``: mean wall time of a whole training step (batch start to batch end:
  matching or generation, forward, backward, optimiser), on CUDA after a synchronise;
- ``perf/tokens_per_s``, ``perf/samples_per_s``: tokens and questions per second on this device.
  Tokens are those of the rows trained on, counted from the batch: for a trace-set batch
  ``sum_q M_q (P_q + 1) + sum_qj L_qj`` (prompt and tag repeated per trace, plus the traces); for
  a batch without traces (RL) the prompts only, so generated tokens are not counted;
- ``perf/mfu``: ``6 * n_params * tokens_per_s / peak_flops`` (the 6ND rule: forward + backward,
  attention and the no-grad matching or generation passes not counted; ``n_params`` = all
  parameters of this rank, frozen ones included);
- ``perf/peak_mem_mb``: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak
  resident set size (``resource.getrusage``).

``peak_flops`` defaults to a measurement, once per device and process, at fit start: the best
of a few square ``torch.matmul`` calls (4096^2 bf16 on CUDA, 512^2 fp32 on CPU) with their own
random generator. That is an achievable rate, not the datasheet peak, so MFU reads higher than a
datasheet-based one; set ``peak_flops`` for comparable numbers (e.g. 989e12 for H100 SXM bf16).
The module's own ``perf/step_s/match|generate|update`` stay as they are. Rank zero writes.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from forklight.callbacks.observing import log_scalars

_MEASURED_PEAK: dict[tuple[str, str], float] = {}  # (device, dtype) -> FLOP/s, measured once per process


def measured_matmul_flops(device: torch.device, repeats: int = 5) -> float:
    """Best FLOP/s of square matmuls on ``device`` (bf16 4096^2 on CUDA, fp32 512^2 elsewhere); cached."""
    on_cuda = device.type == "cuda"
    dtype, size = (torch.bfloat16, 4096) if on_cuda else (torch.float32, 512)
    key = (str(device), str(dtype))
    if key not in _MEASURED_PEAK:
        generator = torch.Generator(device=device).manual_seed(0)  # the global RNG stays untouched
        a = torch.randn(size, size, generator=generator, device=device, dtype=torch.float32).to(dtype)
        b = torch.randn(size, size, generator=generator, device=device, dtype=torch.float32).to(dtype)
        best = float("inf")
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first call warms up
                if on_cuda:
                    torch.cuda.synchronize(device)
                started = time.perf_counter()
                torch.matmul(a, b)
                if on_cuda:
                    torch.cuda.synchronize(device)
                best = min(best, time.perf_counter() - started)
        _MEASURED_PEAK[key] = 2 * size**3 / max(best, 1e-9)
        del a, b
    return _MEASURED_PEAK[key]


def batch_tokens(batch) -> tuple[int, int]:
    """(tokens, questions) of a training batch; see the module docstring for what counts."""
    prompts = getattr(batch, "prompt_ids", None)
    if prompts is None:
        return 0, 0
    traces = getattr(batch, "trace_ids", None) or [[] for _ in prompts]
    tokens = 0
    for prompt, question_traces in zip(prompts, traces):
        if question_traces:
            tokens += len(question_traces) * (len(prompt) + 1) + sum(len(trace) for trace in question_traces)
        else:
            tokens += len(prompt)
    return tokens, len(prompts)


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated on ``device``, else the process's peak resident set, in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class PerfMonitor(L.Callback):
    def __init__(self, every_n_steps: int | None = None, peak_flops: float | None = None) -> None:
        """Tokens/s, samples/s, step time, MFU and peak memory of training.

        Args:
            every_n_steps: optimiser steps per logged window; default the trainer's ``log_every_n_steps``.
            peak_flops: the device's peak FLOP/s for ``perf/mfu``; default: measured once at fit start.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"PerfMonitor.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"PerfMonitor.peak_flops must be > 0 or null, got {peak_flops}")
        self.every_n_steps = every_n_steps
        self.peak_flops = peak_flops
        self._reset()

    def _reset(self) -> None:
        self._seconds, self._tokens, self._samples, self._steps = 0.0, 0, 0, 0
        self._started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self._interval = self.every_n_steps or max(1, trainer.log_every_n_steps)
        self._next_log_step = (trainer.global_step // self._interval + 1) * self._interval
        self._parameters = sum(parameter.numel() for parameter in pl_module.parameters())
        self._peak = self.peak_flops or measured_matmul_flops(pl_module.device)
        if self.peak_flops is None:
            rank_zero_info(f"PerfMonitor: measured matmul peak {self._peak / 1e12:.3g} TFLOP/s on {pl_module.device} "
                           "(set peak_flops for a datasheet-based MFU)")

    def _synchronize(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._synchronize(pl_module)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self._started is None:
            return
        self._synchronize(pl_module)
        self._seconds += time.perf_counter() - self._started
        self._started = None
        tokens, samples = batch_tokens(batch)
        self._tokens += tokens
        self._samples += samples
        self._steps += 1
        if trainer.global_step >= self._next_log_step:
            self._log(trainer, pl_module)
            self._next_log_step = (trainer.global_step // self._interval + 1) * self._interval

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._steps:
            self._log(trainer, pl_module)  # the last, partial window

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = max(self._seconds, 1e-9)
        tokens_per_s = self._tokens / seconds
        log_scalars(trainer, {
            "perf/step_s/train": self._seconds / self._steps,
            "perf/tokens_per_s": tokens_per_s,
            "perf/samples_per_s": self._samples / seconds,
            "perf/mfu": 6 * self._parameters * tokens_per_s / self._peak,
            "perf/peak_mem_mb": peak_memory_mb(pl_module.device),
        })
        self._reset()
