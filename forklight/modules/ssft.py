"""SSFT: set supervised fine-tuning with global forking tokens (DESIGN.md §1).

Run the toy default (CPU, minutes)::

    forklight fit -c configs/ssft.yaml

Per question with traces ``r_1..r_M`` and tags ``g_1..g_N`` (N >= M), each training step:

1. cost matrix, no gradient: ``C[i, j]`` = mean NLL of the first ``match_prefix_tokens`` tokens
   of trace j after the prompt and tag i; all N*M rows of the batch in chunked forward passes;
2. matching: ``sigma = argmin sum_j C[sigma(j), j]`` over injective maps (Hungarian algorithm);
3. loss, with gradient: NTP loss of every trace after its matched tag, summed over tokens and
   divided by the number of supervised tokens in the batch; unmatched tags get no loss.

Data parallel (``configs/strategies/``): each rank matches its own questions; the loss is divided
by the supervised tokens of all ranks' batches, so R processes with batch b step as one with R*b.

``matching`` selects the baselines of the same module: ``random`` (a random injective map each
step, the paper's collapse ablation), ``fixed`` (trace j -> tag j) and ``single`` (every trace
to tag 1: SFT-mixed; use it with ``num_fork_tokens: 1``).

Departures from the paper: the cost uses the model in eval mode (no dropout) so matching is
deterministic; the default tag is the tag matched to the most traces over the whole run
(stored in the ``tag_coverage`` buffer of the checkpoint and in the export metadata).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from forklight.data.rendering import TraceSetBatch, assemble_rows
from forklight.losses import data_parallel_token_mean, grouped_mean_nll, summed_nll
from forklight.matching import MATCHING_MODES, assignment_cost, expected_random_cost, match_traces_to_tags
from forklight.modules.base import ForkModule
from forklight.sharding import forward_is_collective


class SSFTModule(ForkModule):
    def __init__(
        self,
        matching: str = "hungarian",
        match_prefix_tokens: int | None = 1000,
        match_chunk_rows: int = 256,
        **kwargs,
    ) -> None:
        """Set supervised fine-tuning (and its SFT-mixed / random / fixed baselines).

        Args:
            matching: ``hungarian`` (SSFT), ``random``, ``fixed`` or ``single`` (SFT-mixed).
            match_prefix_tokens: trace tokens scored for the matching cost (unset = whole trace).
            match_chunk_rows: rows per no-grad forward pass when computing the cost matrix.
        """
        super().__init__(**kwargs)
        if matching not in MATCHING_MODES:
            raise ValueError(f"model.matching must be one of {MATCHING_MODES}, got {matching!r}")
        if match_prefix_tokens is not None and match_prefix_tokens < 1:
            raise ValueError(f"model.match_prefix_tokens must be >= 1 or null, got {match_prefix_tokens}")
        if match_chunk_rows < 1:
            raise ValueError(f"model.match_chunk_rows must be >= 1, got {match_chunk_rows}")
        self.save_init_hyperparameters()
        self.last_assignments: list[tuple[list[str | None], list[int]]] = []  # (sources, tags) per question
        self.last_match_cost_gap: float | None = None  # per trace: random-assignment cost - matched cost

    @torch.no_grad()
    def trace_tag_costs(self, batch: TraceSetBatch) -> list[np.ndarray]:
        """Cost matrices ``C`` [N, M_b] of every question, from chunked no-grad forward passes.

        Pairs whose model input is identical (same question and tag, traces that agree on their
        first ``P - 1`` scored tokens) share one row: with ``match_prefix_tokens: 1`` a question
        needs N rows, not N * M, and the result is the same.
        """
        num_tags, prefix = len(self.fork_token_ids), self.hparams.match_prefix_tokens
        row_of: dict[tuple, int] = {}  # (question, tag, shared input tokens) -> row
        row_inputs: list[torch.Tensor] = []  # [prompt | tag | trace[:P-1]] per row
        pairs = []  # (row, tag position, scored trace tokens) per (question, tag, trace), in that order
        for q, (prompt, traces) in enumerate(zip(batch.prompt_ids, batch.trace_ids)):
            for tag_id in self.fork_token_ids:
                for trace in traces:
                    scored = trace[:prefix] if prefix is not None else trace
                    key = (q, tag_id, tuple(scored[:-1].tolist()))
                    if key not in row_of:
                        row_of[key] = len(row_inputs)
                        tag = torch.tensor([tag_id], dtype=prompt.dtype, device=prompt.device)
                        row_inputs.append(torch.cat([prompt, tag, scored[:-1]]))
                    pairs.append((row_of[key], len(prompt), scored))
        was_training = self.model.training
        self.model.eval()
        costs = torch.empty(len(pairs))
        chunk_rows = self.hparams.match_chunk_rows
        by_chunk: dict[int, list[int]] = {}
        for p, (row, _, _) in enumerate(pairs):
            by_chunk.setdefault(row // chunk_rows, []).append(p)
        for chunk_index, members in sorted(by_chunk.items()):
            start = chunk_index * chunk_rows
            chunk = row_inputs[start : start + chunk_rows]
            input_ids = torch.full((len(chunk), max(map(len, chunk))), self.tokenizer.pad_token_id, dtype=torch.long)
            for r, row in enumerate(chunk):
                input_ids[r, : len(row)] = row
            # Right padding: no real token attends to a pad under causal attention, so no mask is needed.
            logits = self.model(input_ids=input_ids.to(self.device)).logits  # [R, T, V]
            scored = [pairs[p] for p in members]
            rows = torch.cat([torch.full((len(s),), r - start) for r, _, s in scored])  # [K]
            positions = torch.cat([torch.arange(t, t + len(s)) for _, t, s in scored])  # [K]: tag position onwards
            targets = torch.cat([s.cpu() for _, _, s in scored])  # [K]
            owners = torch.cat([torch.full((len(s),), i) for i, (_, _, s) in enumerate(scored)])  # [K]
            costs[members] = grouped_mean_nll(logits, rows, positions, targets, owners, len(members)).float().cpu()
        if forward_is_collective(self.model):  # FSDP: as many forward passes as the busiest rank, or it waits
            busiest = self.trainer.strategy.reduce(torch.tensor(len(by_chunk), device=self.device), reduce_op="max")
            for _ in range(int(busiest) - len(by_chunk)):
                self.model(input_ids=torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device))
        self.model.train(was_training)
        flat = costs.numpy()  # ordered [question, tag, trace]
        matrices, offset = [], 0
        for question_traces in batch.trace_ids:
            size = num_tags * len(question_traces)
            matrices.append(flat[offset : offset + size].reshape(num_tags, len(question_traces)))  # [N, M_b]
            offset += size
        return matrices

    def match(self, batch: TraceSetBatch) -> list[np.ndarray]:
        """Tag index of every trace, per question (the assignment sigma)."""
        mode = self.hparams.matching
        if mode != "hungarian":  # random, fixed and single need no cost: skip its forward passes
            rng = np.random.default_rng((self.hparams.seed, self.global_step, self.global_rank))
            shapes = [np.zeros((len(self.fork_token_ids), len(t))) for t in batch.trace_ids]  # [N, M_b]
            return [match_traces_to_tags(shape, mode, rng) for shape in shapes]
        costs = self.trace_tag_costs(batch)
        assignments = [match_traces_to_tags(cost, mode) for cost in costs]
        gaps = [
            (expected_random_cost(cost) - assignment_cost(cost, assignment)) / cost.shape[1]
            for cost, assignment in zip(costs, assignments)
        ]
        self.last_match_cost_gap = float(np.mean(gaps))
        return assignments

    def matched_loss(self, batch: TraceSetBatch, assignments: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, supervised tokens): NTP loss of every trace after its matched tag (step 3).

        Divided by the supervised tokens of the global batch (all data-parallel ranks), which are
        returned: with DDP's or FSDP's gradient averaging, R processes with batch b take the same
        step as one process with batch R*b (:func:`~forklight.losses.data_parallel_token_mean`).
        """
        prompts, tags, traces = [], [], []
        for prompt, question_traces, assignment in zip(batch.prompt_ids, batch.trace_ids, assignments):
            for trace, tag in zip(question_traces, assignment):
                prompts.append(prompt)
                tags.append(self.fork_token_ids[tag])
                traces.append(trace)
        rows = assemble_rows(prompts, tags, traces, self.tokenizer.pad_token_id)  # [B*M, T]
        # Rows are right-padded: under causal attention no real token sees a pad, and pads get no
        # loss, so no attention mask is needed (the masked path is ~1.5x slower on CPU).
        logits = self.model(input_ids=rows.input_ids).logits  # [B*M, T, V]
        nll_sum, num_tokens = summed_nll(logits, rows.labels)
        global_tokens = self.sum_over_ranks(num_tokens)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return data_parallel_token_mean(nll_sum, global_tokens, world_size), global_tokens

    def training_step(self, batch: TraceSetBatch, batch_idx: int) -> torch.Tensor | None:
        started = time.perf_counter()
        assignments = self.match(batch)
        matched = time.perf_counter()
        loss, num_tokens = self.matched_loss(batch, assignments)
        skipped = self.skip_nonfinite(loss, batch, batch_idx)  # raises under model.on_nonfinite=error
        self.log("train/nonfinite_skipped", float(self.fault_counts["nonfinite_skipped"]), batch_size=len(batch))
        if skipped:
            return None  # Lightning then takes no backward and no update; the step still counts

        usage = np.bincount(np.concatenate(assignments), minlength=len(self.fork_token_ids))  # [N], this rank
        usage = self.sum_over_ranks(torch.as_tensor(usage, device=self.device)).cpu().numpy()  # [N], global batch
        self.tag_coverage += torch.as_tensor(usage, dtype=self.tag_coverage.dtype, device=self.tag_coverage.device)
        self.last_assignments = [(sources, a.tolist()) for sources, a in zip(batch.sources, assignments)]
        size = len(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=size, sync_dist=True)  # mean over ranks: the global loss
        for tag, count in enumerate(usage):
            self.log(f"fork/usage/tag{tag + 1}", float(count / usage.sum()), batch_size=size)
        if self.last_match_cost_gap is not None:
            self.log("train/match_cost_gap", self.last_match_cost_gap, batch_size=size)
        self.log("perf/step_s/match", matched - started, batch_size=size)
        self.log("perf/supervised_tokens", num_tokens, batch_size=size, reduce_fx="sum")
        return loss
