"""``SpecializationMonitor``: watch the forking tokens specialise (or collapse) in TensorBoard.

SSFT (modules with ``last_assignments``), every ``every_n_steps`` steps (or every epoch):

- ``fork/assignments`` (image): how many training traces of each source were matched to each
  tag in the window; colour = the share of the tag's traces (rows sum to 1), text = counts.
  Specialisation is one bright cell per used row; collapse is identical rows.
- ``fork/assignment_entropy`` (scalar): ``H(source | tag)`` in nats, the usage-weighted mean
  over tags of the entropy of each tag's source distribution. 0 = every tag takes traces of a
  single source; ``H(source)`` (at most ``log(number of sources)``) = tags ignore the source.
- ``fork/cost/probe{q}`` (image): the matching cost ``C`` [N tags x M traces] of the first
  ``probe_questions`` validation questions, recomputed at each interval (colour: low cost =
  dark, per image; text: mean NLL; framed: the Hungarian matching of that ``C``).

GFPO (modules whose ``learns_tag_policy`` is true, or ``policy_views: true``), at the end of every
validation, from the tag distribution ``pi(i | x)`` of each validation question
(``last_evaluation[q].policy``):

- ``fork/policy_hist`` (histogram): the most likely tag (1-based) of each question;
- ``fork/policy_entropy_val`` (scalar): mean over questions of the entropy of ``pi(. | x)``.

It only observes: the cost probes run under :func:`~forklight.callbacks.observing.observing`
(no gradient, RNG and modes restored), on every rank (sharded models need every rank in a
forward pass), and only rank zero writes. The counts come from rank zero's batches.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import lightning as L
import numpy as np
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn

from forklight.callbacks.drawing import heatmap
from forklight.callbacks.observing import log_scalars, observing, tensorboard_writers
from forklight.matching import match_traces_to_tags


def source_name(source: str | None, index: int) -> str:
    """A trace's source, or ``trace{j}`` (1-based position in its question) when it has none."""
    return source if source else f"trace{index + 1}"


def conditional_entropy(counts: np.ndarray) -> float:
    """``H(column | row)`` in nats of a count matrix [rows, columns] (0 when empty)."""
    total = counts.sum()
    if total == 0:
        return 0.0
    row_totals = counts.sum(axis=1, keepdims=True)  # [rows, 1]
    shares = np.divide(counts, row_totals, out=np.zeros_like(counts, dtype=np.float64), where=row_totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy_per_row = -np.where(shares > 0, shares * np.log(shares), 0.0).sum(axis=1)  # [rows]
    return float((row_totals[:, 0] / total) @ entropy_per_row)


class SpecializationMonitor(L.Callback):
    def __init__(self, every_n_steps: int | None = 500, probe_questions: int = 4, policy_views: bool | None = None) -> None:
        """Tag x source assignment heatmaps, their entropy, cost-matrix probes, and (GFPO) tag-policy views.

        Args:
            every_n_steps: optimiser steps per logged window; null = once per training epoch. The
                last, partial window is logged when training ends.
            probe_questions: validation questions whose cost matrix is drawn (0 = none).
            policy_views: log ``fork/policy_hist`` and ``fork/policy_entropy_val`` at validation end;
                default (null): for modules that train their tag policy (``learns_tag_policy``: GFPO).
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"SpecializationMonitor.every_n_steps must be >= 1 or null, got {every_n_steps}")
        if probe_questions < 0:
            raise ValueError(f"SpecializationMonitor.probe_questions must be >= 0, got {probe_questions}")
        self.every_n_steps = every_n_steps
        self.probe_questions = probe_questions
        self.policy_views = policy_views
        self._counts: Counter[tuple[int, str]] = Counter()  # (tag, source) -> traces in this window
        self._next_log_step = every_n_steps or 0
        self._probe_batch = None

    # ---- assignments (SSFT) ----------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._counts.clear()
        self._next_log_step = (trainer.global_step // self.every_n_steps + 1) * self.every_n_steps if self.every_n_steps else 0
        if self.probe_questions and hasattr(pl_module, "trace_tag_costs"):
            with observing(pl_module):
                self._probe_batch = self._first_val_questions(trainer, len(pl_module.fork_token_ids))

    def _first_val_questions(self, trainer: L.Trainer, num_tags: int):
        """The first ``probe_questions`` validation questions, each with at most ``num_tags`` traces
        (validation keeps every trace; a matching needs no more traces than tags)."""
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            rank_zero_warn("SpecializationMonitor: no datamodule with a val_dataloader; fork/cost probes are off")
            return None
        try:
            loader = datamodule.val_dataloader()
        except (KeyError, NotImplementedError):  # no validation split
            rank_zero_warn("SpecializationMonitor: no validation data; fork/cost probes are off")
            return None
        dataset = loader.dataset
        if not hasattr(dataset, "__len__") or len(dataset) == 0:
            return None
        items = [dataset[i] for i in range(min(self.probe_questions, len(dataset)))]
        batch = loader.collate_fn(items)
        batch = replace(batch, trace_ids=[traces[:num_tags] for traces in batch.trace_ids],
                        sources=[sources[:num_tags] for sources in batch.sources])
        if not all(len(traces) for traces in batch.trace_ids):
            rank_zero_warn("SpecializationMonitor: the first validation questions have no traces; fork/cost probes are off")
            return None
        return batch

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        assignments = getattr(pl_module, "last_assignments", None)
        if assignments is None:
            return
        for sources, tags in assignments:
            for j, (source, tag) in enumerate(zip(sources, tags)):
                self._counts[(int(tag), source_name(source, j))] += 1
        if self.every_n_steps is not None and trainer.global_step >= self._next_log_step:
            self._log_window(trainer, pl_module)
            step = trainer.global_step
            self._next_log_step = (step // self.every_n_steps + 1) * self.every_n_steps

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.every_n_steps is None:
            self._log_window(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_window(trainer, pl_module)  # the last, partial window

    def _log_window(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts:
            return
        names = list(getattr(pl_module, "fork_tokens", []))
        num_tags = max(len(names), 1 + max(tag for tag, _ in self._counts))
        names += [f"tag{i + 1}" for i in range(len(names), num_tags)]
        sources = sorted({source for _, source in self._counts})
        counts = np.zeros((num_tags, len(sources)))  # [N, S]
        for (tag, source), count in self._counts.items():
            counts[tag, sources.index(source)] = count
        self._counts.clear()
        step = trainer.global_step
        log_scalars(trainer, {"fork/assignment_entropy": conditional_entropy(counts)}, step)
        row_totals = counts.sum(axis=1, keepdims=True)
        shares = np.divide(counts, row_totals, out=np.full_like(counts, np.nan), where=row_totals > 0)  # [N, S]
        image = heatmap(shares, names, sources, [[f"{int(c)}" for c in row] for row in counts],
                        title=f"traces per tag x source, step {step}")
        for writer in tensorboard_writers(trainer):
            writer.add_image("fork/assignments", image, step, dataformats="HWC")
        self._log_cost_probes(trainer, pl_module, names)

    def _log_cost_probes(self, trainer: L.Trainer, pl_module: L.LightningModule, names: list[str]) -> None:
        if self._probe_batch is None:
            return
        with observing(pl_module):
            batch = move_data_to_device(self._probe_batch, pl_module.device)
            costs = pl_module.trace_tag_costs(batch)  # q -> [N, M_q]
        writers = tensorboard_writers(trainer)
        for q, cost in enumerate(costs):
            assignment = match_traces_to_tags(cost, "hungarian")  # [M_q] tag of each trace
            low, high = float(cost.min()), float(cost.max())
            shade = (cost - low) / (high - low) if high > low else np.zeros_like(cost)
            columns = [source_name(source, j) for j, source in enumerate(self._probe_batch.sources[q])]
            image = heatmap(shade, names[: cost.shape[0]], columns, [[f"{c:.2f}" for c in row] for row in cost],
                            marked=[(int(tag), j) for j, tag in enumerate(assignment)],
                            title=f"cost C, question {self._probe_batch.ids[q]}")
            for writer in writers:
                writer.add_image(f"fork/cost/probe{q}", image, trainer.global_step, dataformats="HWC")

    # ---- tag policy (GFPO) -------------------------------------------------------------------
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        wanted = self.policy_views if self.policy_views is not None else getattr(pl_module, "learns_tag_policy", False)
        evaluations = getattr(pl_module, "last_evaluation", None)
        if trainer.sanity_checking or not wanted or not evaluations or not all(e.policy for e in evaluations):
            return
        policy = np.array([e.policy for e in evaluations], dtype=np.float64)  # [Q, N]
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(policy > 0, policy * np.log(policy), 0.0).sum(axis=1)  # [Q]
        log_scalars(trainer, {"fork/policy_entropy_val": float(entropy.mean())})
        favourite = policy.argmax(axis=1) + 1  # [Q] 1-based tag
        for writer in tensorboard_writers(trainer):
            writer.add_histogram("fork/policy_hist", favourite, trainer.global_step,
                                 bins=np.arange(0.5, policy.shape[1] + 1.0))
