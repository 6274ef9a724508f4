"""SSFT: set supervised fine-tuning with global forking tokens (DESIGN.md §1).

Run the toy default (CPU, minutes)::

    forklight fit -c configs/ssft.yaml

Per question with traces ``r_1..r_M`` and tags ``g_1..g_N`` (N >= M), each training step:

1. cost matrix, no gradient: ``C[i, j]`` = mean NLL of the first ``match_prefix_tokens`` tokens
   of trace j after the prompt and tag i; all N*M rows of the batch in chunked forward passes;
2. matching: ``sigma = argmin sum_j C[sigma(j), j]`` over injective maps (Hungarian algorithm);
3. loss, with gradient: NTP loss of every trace after its matched tag, summed over tokens and
   divided by the number of supervised tokens in the batch (with ``trainer.accumulate_grad_batches``:
   in all micro-batches of the optimiser step, :meth:`SSFTModule.training_step`); unmatched tags get no loss.

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

import contextlib
import time

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn

from forklight.data.rendering import TraceSetBatch, assemble_rows, pack_rows
from forklight.head import (check_chunk_tokens, head_nll, head_nll_sum, head_removed, hidden_states, liger_nll_sum,
                            scored_positions)
from forklight.losses import (
    TokenWindow,
    accumulation_correction,
    data_parallel_token_mean,
    group_means,
    scored_token_nll,
    window_token_mean_part,
)
from forklight.matching import MATCHING_MODES, assignment_cost, expected_random_cost, match_traces_to_tags
from forklight.models import CacheReuse, output_cache, probe_cache_reuse
from forklight.modules.base import ForkModule
from forklight.sharding import forward_is_collective

MATCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def right_padded(rows: list[torch.Tensor], pad_id: int) -> torch.Tensor:
    """[R, T] long tensor of ``rows`` right-padded with ``pad_id`` to the longest."""
    out = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, row in enumerate(rows):
        out[r, : len(row)] = row
    return out


class SSFTModule(ForkModule):
    def __init__(
        self,
        matching: str = "hungarian",
        match_prefix_tokens: int | None = 1000,
        match_chunk_tokens: int = 16384,
        match_chunk_rows: int | None = None,
        match_share_prompt: bool = True,
        match_dtype: str | None = None,
        **kwargs,
    ) -> None:
        """Set supervised fine-tuning (and its SFT-mixed / random / fixed baselines).

        Args:
            matching: ``hungarian`` (SSFT), ``random``, ``fixed`` or ``single`` (SFT-mixed).
            match_prefix_tokens: trace tokens scored for the matching cost (unset = whole trace).
            match_chunk_tokens: right-padded tokens (rows x longest row) per no-grad forward pass of the cost
                matrix; its logits are never whole (``model.loss_head``), so the default is safe at a 152k vocabulary.
            match_chunk_rows: also at most this many rows per cost forward (unset: no row limit).
            match_share_prompt: run each question's prompt once per chunk and the cost rows only over
                ``[tag | trace prefix]`` on its KV cache (same costs; models whose cache has
                sliding-window or recurrent layers fall back to whole rows).
            match_dtype: ``bfloat16`` (or ``float16``) runs the cost forwards under ``torch.autocast``
                in that dtype: ~2x faster where the hardware has fast bf16 matmuls, costs within
                ~0.1-0.2 nats, and the matching differs only on near-ties (measured on the toy task:
                95-99% of questions get the same assignment). Unset = the precision of the training
                step (under ``trainer.precision: bf16-mixed`` the cost forwards already autocast).
        """
        super().__init__(**kwargs)
        if matching not in MATCHING_MODES:
            raise ValueError(f"model.matching must be one of {MATCHING_MODES}, got {matching!r}")
        if match_prefix_tokens is not None and match_prefix_tokens < 1:
            raise ValueError(f"model.match_prefix_tokens must be >= 1 or null, got {match_prefix_tokens}")
        if match_chunk_rows is not None and match_chunk_rows < 1:
            raise ValueError(f"model.match_chunk_rows must be >= 1 or null, got {match_chunk_rows}")
        check_chunk_tokens(match_chunk_tokens, "model.init_args.match_chunk_tokens")
        if match_dtype is not None and match_dtype not in MATCH_DTYPES:
            raise ValueError(f"model.match_dtype must be one of {sorted(MATCH_DTYPES)} or null, got {match_dtype!r}")
        self.last_assignments: list[tuple[list[str | None], list[int]]] = []  # (sources, tags) per question
        self.last_match_cost_gap: float | None = None  # per trace: random-assignment cost - matched cost
        self._cache_reuse: CacheReuse | None = None  # probed on first use (cache_reuse)

    @torch.no_grad()
    def trace_tag_costs(self, batch: TraceSetBatch) -> list[np.ndarray]:
        """Cost matrices ``C`` [N, M_b] of every question, from chunked no-grad forward passes.

        Pairs whose model input is identical (same question and tag, traces that agree on their
        first ``P - 1`` scored tokens) share one row: with ``match_prefix_tokens: 1`` a question
        needs N rows, not N * M, and the result is the same. With ``match_share_prompt`` each
        chunk runs its questions' prompts once and its rows only over ``[tag | trace prefix]``
        on top of the prompt's KV cache (:meth:`_cost_logits`).
        """
        num_tags, prefix = len(self.fork_token_ids), self.hparams.match_prefix_tokens
        row_of: dict[tuple, int] = {}  # (question, tag, shared input tokens) -> row
        row_questions: list[int] = []  # question of each row
        row_suffixes: list[torch.Tensor] = []  # [tag | trace[:P-1]] per row: its input after the prompt
        pairs = []  # (row, scored trace tokens) per (question, tag, trace), in that order
        for q, (prompt, traces) in enumerate(zip(batch.prompt_ids, batch.trace_ids)):
            for tag_id in self.fork_token_ids:
                tag = torch.tensor([tag_id], dtype=prompt.dtype, device=prompt.device)
                for trace in traces:
                    scored = trace[:prefix] if prefix is not None else trace
                    key = (q, tag_id, tuple(scored[:-1].tolist()))
                    if key not in row_of:
                        row_of[key] = len(row_suffixes)
                        row_questions.append(q)
                        row_suffixes.append(torch.cat([tag, scored[:-1]]))
                    pairs.append((row_of[key], scored))
        was_training = self.model.training
        self.model.eval()
        costs = torch.empty(len(pairs), dtype=torch.float32)  # whatever the default dtype (bf16-true sets it)
        chunked = self.head_path().chunked
        bounds = self.cost_chunks([len(batch.prompt_ids[q]) + len(suffix) for q, suffix in zip(row_questions, row_suffixes)])
        chunk_of_row = np.searchsorted(np.asarray(bounds[1:]), np.arange(len(row_suffixes)), side="right")
        by_chunk: dict[int, list[int]] = {}
        for p, (row, _) in enumerate(pairs):
            by_chunk.setdefault(int(chunk_of_row[row]), []).append(p)
        forwards = 0
        for chunk_index, members in sorted(by_chunk.items()):
            start = bounds[chunk_index]
            chunk = slice(start, bounds[chunk_index + 1])
            with head_removed(self.model) if chunked else contextlib.nullcontext() as head:
                outputs, tag_positions, used = self._cost_logits(batch.prompt_ids, row_questions[chunk],
                                                                 row_suffixes[chunk])  # [R, T, D] or [R, T, V]
            forwards += used
            scored = [pairs[p] for p in members]
            rows = torch.cat([torch.full((len(s),), r - start) for r, s in scored])  # [K]
            positions = torch.cat([torch.arange(len(s)) + tag_positions[r - start] for r, s in scored])  # [K]: tag onwards
            targets = torch.cat([s.cpu() for _, s in scored])  # [K]
            owners = torch.cat([torch.full((len(s),), i) for i, (_, s) in enumerate(scored)])  # [K]
            if chunked:  # the head on the scored positions only
                device = outputs.device
                with self._match_autocast():
                    nll = head_nll(head, outputs[rows.to(device), positions.to(device)], targets,
                                   self.hparams.loss_chunk_tokens)  # [K]
            else:
                nll = scored_token_nll(outputs, rows, positions, targets)  # [K]
            costs[members] = group_means(nll, owners, len(members)).float().cpu()
            del outputs
        if forward_is_collective(self.model):  # FSDP: as many forward passes as the busiest rank, or it waits
            busiest = self.trainer.strategy.reduce(torch.tensor(forwards, device=self.device), reduce_op="max")
            for _ in range(int(busiest) - forwards):
                self.model(input_ids=torch.full((1, 1), self.tokenizer.pad_token_id, device=self.device), use_cache=False)
        self.model.train(was_training)
        flat = costs.numpy()  # ordered [question, tag, trace]
        matrices, offset = [], 0
        for question_traces in batch.trace_ids:
            size = num_tags * len(question_traces)
            matrices.append(flat[offset : offset + size].reshape(num_tags, len(question_traces)))  # [N, M_b]
            offset += size
        return matrices

    def cost_chunks(self, lengths: list[int]) -> list[int]:
        """Boundaries ``[0, b_1, ..., R]`` of the cost forwards' chunks of consecutive rows: as many rows as fit in
        ``match_chunk_tokens`` right-padded tokens (rows x the chunk's longest row; at least one row), and at most
        ``match_chunk_rows`` rows when that is set."""
        budget, most = self.hparams.match_chunk_tokens, self.hparams.match_chunk_rows
        bounds, longest = [0], 0
        for row, length in enumerate(lengths):
            size = row - bounds[-1]
            if size and ((size + 1) * max(longest, length) > budget or (most is not None and size >= most)):
                bounds.append(row)
                longest = 0
            longest = max(longest, length)
        return bounds + [len(lengths)]

    def _cost_logits(
        self, prompts: list[torch.Tensor], questions: list[int], suffixes: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[int], int]:
        """(logits [R, T, V], position of each row's tag in them, forward passes taken) of one chunk.

        Row r is ``prompts[questions[r]]`` followed by ``suffixes[r]`` (tag and trace prefix). With
        the prompt shared: one right-padded forward of the chunk's distinct prompts with
        ``use_cache``, its KV cache indexed out to the rows, then one forward of the right-padded
        suffixes at positions ``len(prompt) + t`` whose attention mask hides the prompt padding;
        the logits then cover the suffixes only. Otherwise one forward over whole rows.
        """
        pad, device = self.tokenizer.pad_token_id, self.device
        reuse = self.cache_reuse()
        with self._match_autocast():
            if self._prompt_sharing():
                used = sorted(set(questions))
                local = {q: i for i, q in enumerate(used)}
                prompt_ids = right_padded([prompts[q] for q in used], pad).to(device)  # [Q, S]
                last = {"logits_to_keep": 1} if reuse.logits_to_keep else {}  # only the cache is needed
                cache = output_cache(self.model(input_ids=prompt_ids, use_cache=True, **last))
                cache.batch_select_indices(torch.tensor([local[q] for q in questions], device=device))  # [R, ...]
                suffix_ids = right_padded(suffixes, pad).to(device)  # [R, T]
                starts = torch.tensor([len(prompts[q]) for q in questions], device=device)  # [R]
                position_ids = starts[:, None] + torch.arange(suffix_ids.shape[1], device=device)  # [R, T]
                attention_mask = None  # prompts of one length: the cache has no padding
                if len({len(prompts[q]) for q in used}) > 1:
                    prompt_mask = torch.arange(prompt_ids.shape[1], device=device) < starts[:, None]  # [R, S]
                    attention_mask = torch.cat([prompt_mask, torch.ones_like(suffix_ids, dtype=torch.bool)], 1).long()
                logits = self.model(input_ids=suffix_ids, position_ids=position_ids, attention_mask=attention_mask,
                                    use_cache=True, **{reuse.argument: cache}).logits  # [R, T, V]
                return logits, [0] * len(questions), 2
            # Right padding: no real token attends to a pad under causal attention, so no mask is needed.
            input_ids = right_padded([torch.cat([prompts[q], suffix]) for q, suffix in zip(questions, suffixes)], pad)
            tag_positions = [len(prompts[q]) for q in questions]
            skipped = min(tag_positions) if reuse.logits_to_keep else 0  # prompt positions: no logits needed
            keep = {"logits_to_keep": input_ids.shape[1] - skipped} if skipped else {}
            logits = self.model(input_ids=input_ids.to(device), use_cache=False, **keep).logits  # [R, T - skipped, V]
            return logits, [t - skipped for t in tag_positions], 1

    def cache_reuse(self) -> CacheReuse:
        """What this model's forward does with a KV cache, probed once on a tiny input
        (:func:`~forklight.models.probe_cache_reuse`); ``match_share_prompt`` on a model that cannot
        reuse its cache says so once and uses whole rows."""
        if self._cache_reuse is None:
            was_training = self.model.training
            self.model.eval()
            try:
                self._cache_reuse = probe_cache_reuse(self.model, self.tokenizer.pad_token_id)
            finally:
                self.model.train(was_training)
            if self.hparams.match_share_prompt and self._cache_reuse.argument is None:
                rank_zero_warn(f"model.match_share_prompt is on, but this model cannot continue a prompt from its KV "
                               f"cache ({self._cache_reuse.reason}): matching costs run whole rows (same costs, slower)")
        return self._cache_reuse

    def _prompt_sharing(self) -> bool:
        """Whether cost rows run on their prompt's KV cache: ``match_share_prompt`` and a model that was
        seen to continue a prompt from its cache (:meth:`cache_reuse`)."""
        return bool(self.hparams.match_share_prompt) and self.cache_reuse().argument is not None

    def _match_autocast(self):
        """Autocast context of the cost forwards: ``match_dtype`` on this device, else none."""
        if self.hparams.match_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=MATCH_DTYPES[self.hparams.match_dtype])

    def match(self, batch: TraceSetBatch, batch_idx: int = 0) -> list[np.ndarray]:
        """Tag index of every trace, per question (the assignment sigma).

        ``random`` seeds its generator with (seed, epoch, ``batch_idx``, rank): a fresh map for every
        micro-batch (also those one optimiser step accumulates), and the same maps in a resumed run.
        """
        mode = self.hparams.matching
        if mode != "hungarian":  # random, fixed and single need no cost: skip its forward passes
            rng = np.random.default_rng((self.hparams.seed, self.current_epoch, batch_idx, self.global_rank))
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
        for b, (prompt, question_traces, assignment) in enumerate(zip(batch.prompt_ids, batch.trace_ids, assignments)):
            for j, (trace, tag) in enumerate(zip(question_traces, assignment)):
                if not batch.trains(b, j):  # another batch's piece of this question (data.max_tokens_per_batch)
                    continue
                prompts.append(prompt)
                tags.append(self.fork_token_ids[tag])
                traces.append(trace)
        pad = self.tokenizer.pad_token_id
        if self.packing():  # [P, L], position_ids restarting per sequence
            rows = pack_rows(prompts, tags, traces, pad, self.hparams.pack_length)
            inputs = {"input_ids": rows.input_ids, "position_ids": rows.position_ids}
        else:  # [B*M, T]
            rows = assemble_rows(prompts, tags, traces, pad)
            inputs = {"input_ids": rows.input_ids}
        # Rows are right-padded: under causal attention no real token sees a pad, and pads get no
        # loss, so no attention mask is needed (the masked path is ~1.5x slower on CPU).
        path = self.head_path()
        if path.chunked:  # the head on the scored positions only, fused: Liger's kernel, or PyTorch's for a plain head
            hidden, head = hidden_states(self.model, **inputs)  # [R, T, D]
            at, positions = scored_positions(rows.labels)  # [K], [K]
            scored, targets = hidden[at, positions], rows.labels[at, positions + 1]  # [K, D], [K]
            if path.liger:
                nll_sum = liger_nll_sum(head, scored, targets)
            else:
                nll_sum = head_nll_sum(head, scored, targets, self.hparams.get("loss_chunk_tokens", 512))
            num_tokens = torch.tensor(float(len(at)), device=self.device)
        else:
            nll = self.supervised_nll(self.model, rows.labels, **inputs)  # [K]
            nll_sum, num_tokens = nll.sum(), torch.tensor(float(len(nll)), device=nll.device)
        global_tokens = self.sum_over_ranks(num_tokens)
        world_size = self.trainer.world_size if self._trainer is not None else 1
        return data_parallel_token_mean(nll_sum, global_tokens, world_size), global_tokens

    _token_window: TokenWindow | None = None  # the micro-batches of the optimiser step being accumulated

    def training_step(self, batch: TraceSetBatch, batch_idx: int) -> torch.Tensor | None:
        """One micro-batch: match, then the loss to backpropagate (``None``: skipped, non-finite).

        With ``trainer.accumulate_grad_batches`` K > 1 the step's loss is the token mean over all K
        micro-batches of all ranks (one batch of K times the size steps the same): the returned loss is
        divided by the first micro-batch's tokens and :meth:`on_before_optimizer_step` rescales the
        summed gradients (:func:`~forklight.losses.window_token_mean_part`). ``train/loss`` is the token
        mean NLL of the step's micro-batches so far, all ranks; at the step's last micro-batch (logged with
        the step) that is the loss of the step.
        """
        accumulate = self.trainer.accumulate_grad_batches if self._trainer is not None else 1
        if batch_idx % accumulate == 0:  # Lightning zeroes the gradients here: a new window opens
            self._token_window = None
        started = time.perf_counter()
        assignments = self.match(batch, batch_idx)
        matched = time.perf_counter()
        loss, num_tokens = self.matched_loss(batch, assignments)  # this micro-batch's global token mean
        skipped = self.skip_nonfinite(loss, batch, batch_idx)  # raises under model.on_nonfinite=error
        self.log("train/nonfinite_skipped", float(self.fault_counts["nonfinite_skipped"]), batch_size=len(batch))
        if skipped:
            return None  # Lightning then takes no backward (its tokens stay out of the window); the step still counts
        tokens = float(num_tokens)  # global, so every rank's window holds the same counts
        if self._token_window is None:
            self._token_window = TokenWindow(reference_tokens=tokens)
        window_loss = self._token_window.add(loss, tokens)  # this rank's part of the window's token mean

        kept = [[j for j in range(len(a)) if batch.trains(b, j)] for b, a in enumerate(assignments)]  # trained traces
        trained = [a[js] for a, js in zip(assignments, kept)]
        usage = np.bincount(np.concatenate(trained), minlength=len(self.fork_token_ids))  # [N], this rank's trained
        usage = self.sum_over_ranks(torch.as_tensor(usage, device=self.device)).cpu().numpy()  # [N], global batch
        self.tag_coverage += torch.as_tensor(usage, dtype=self.tag_coverage.dtype, device=self.tag_coverage.device)
        self.last_assignments = [([sources[j] for j in js], a.tolist()) for sources, js, a in zip(batch.sources, kept, trained)]
        size = len(batch)
        self.log("train/loss", window_loss, prog_bar=True, batch_size=size, sync_dist=True)  # mean over ranks: global
        for tag, count in enumerate(usage):
            self.log(f"fork/usage/tag{tag + 1}", float(count / usage.sum()), batch_size=size)
        if self.last_match_cost_gap is not None:
            self.log("train/match_cost_gap", self.last_match_cost_gap, batch_size=size)
        self.log("perf/step_s/match", matched - started, batch_size=size)
        self.log("perf/supervised_tokens", num_tokens, batch_size=size, reduce_fx="sum")
        return window_token_mean_part(loss, tokens, self._token_window.reference_tokens, accumulate)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Turn the accumulated gradients of ``sum nll / first micro-batch's tokens`` into those of the
        step's token mean (:func:`~forklight.losses.accumulation_correction`; 1 without accumulation).

        Lightning calls this after the step's last backward (and, under 16-bit AMP, after unscaling the
        gradients) and before gradient clipping and ``optimizer.step``, on every rank alike; FSDP's
        sharded gradients scale shard by shard.
        """
        window, self._token_window = self._token_window, None
        if window is None:  # every micro-batch skipped: no gradients
            return
        correction = accumulation_correction(window.reference_tokens, window.tokens)
        if correction != 1.0:
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    if parameter.grad is not None:
                        parameter.grad.mul_(correction)
