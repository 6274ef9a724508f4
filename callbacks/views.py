"""``EvaluationViews``: per-tag pictures and samples of every validation, in TensorBoard.

At the end of each validation (not the sanity check), from ``pl_module.last_evaluation`` (one
:class:`~forklight.evaluation.QuestionEvaluation` per question, samples indexed [tag][sample]) and
the metrics the evaluation logged (``val/tag{i}/pass@1``, ``val/tag{i}/len``):

- ``views/tag_pass_len`` (image): per tag, the logged pass@1 and mean completion length side by
  side (the length bar is scaled by ``max_new_tokens``: a full bar means answers run into the limit);
- ``views/tag{i}/len`` (histogram): completion lengths of tag i (1-based);
- ``samples/tag{i}`` (text): a markdown table of tag i's completions on the same few validation
  questions every time (the first ``sample_questions`` of the first validation): question id,
  gold answer, completion, strategy (when a classifier is set) and score.

Specialised tags differ in length and strategy on the same question; collapsed tags write the
same completion. Rank zero only; it reads what the module already evaluated and logged, and computes nothing.
"""

from __future__ import annotations

import lightning as L
import numpy as np

from forklight.callbacks.drawing import grouped_bars
from forklight.callbacks.observing import tensorboard_writers
from forklight.evaluation import QuestionEvaluation


def _cell(text: object, max_chars: int) -> str:
    """``text`` as one markdown table cell: shortened, pipes escaped, newlines as ``<br>``."""
    text = "" if text is None else str(text)
    if len(text) > max_chars:
        text = text[: max_chars - 1] + "…"
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def samples_table(evaluations: list[QuestionEvaluation], tag: int, max_chars: int = 400) -> str:
    """Markdown table of tag ``tag``'s (0-based) samples on ``evaluations``."""
    lines = ["| question | gold | sample | completion | strategy | score |", "|---|---|---|---|---|---|"]
    for e in evaluations:
        for sample, text in enumerate(e.texts[tag]):
            strategy = e.strategies[tag][sample] if e.strategies else None
            score = e.scores[tag][sample]
            cells = [e.id, e.answer, sample, text, strategy, "n/a" if score is None else f"{score:g}"]
            lines.append("| " + " | ".join(_cell(cell, max_chars) for cell in cells) + " |")
    return "\n".join(lines)


class EvaluationViews(L.Callback):
    def __init__(self, sample_questions: int = 3, max_chars: int = 400) -> None:
        """Per-tag pass@1/length chart, length histograms and completion samples at each validation.

        Args:
            sample_questions: validation questions whose completions are shown under ``samples/tag{i}``.
            max_chars: completions longer than this are shortened in the sample tables.
        """
        if sample_questions < 0 or max_chars < 1:
            raise ValueError(f"EvaluationViews needs sample_questions >= 0 and max_chars >= 1, got "
                             f"{sample_questions}, {max_chars}")
        self.sample_questions = sample_questions
        self.max_chars = max_chars
        self._question_ids: list[str] = []  # fixed at the first validation

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        evaluations = getattr(pl_module, "last_evaluation", None)
        writers = tensorboard_writers(trainer)
        if trainer.sanity_checking or not evaluations or not writers:
            return
        step = trainer.global_step
        num_tags = len(evaluations[0].scores)
        names = [f"tag{tag + 1}" for tag in range(num_tags)]
        logged = trainer.callback_metrics  # this validation's metrics (forklight.evaluation.evaluation_metrics)
        # a tag without samples under the evaluation protocol (model.eval_tag_sampling) shows as 0
        pass_at_1 = [float(logged.get(f"val/{name}/pass@1", 0.0)) for name in names]
        mean_length = [float(logged.get(f"val/{name}/len", 0.0)) for name in names]
        lengths = [np.array([length for e in evaluations for length in e.lengths[tag]], dtype=np.float64)
                   for tag in range(num_tags)]  # [N] arrays of every completion's length, for the histograms
        length_scale = float(pl_module.hparams.get("max_new_tokens") or max(mean_length + [1.0]))
        chart = grouped_bars(
            names,
            {"pass@1": pass_at_1, "mean length": mean_length},
            {"pass@1": pass_at_1, "mean length": [length / length_scale for length in mean_length]},
            title=f"per tag, step {step} (length bar: / max_new_tokens = {length_scale:g})",
        )
        by_id = {e.id: e for e in evaluations}
        if not self._question_ids or not all(question in by_id for question in self._question_ids):
            self._question_ids = [e.id for e in evaluations[: self.sample_questions]]
        shown = [by_id[question] for question in self._question_ids]
        for writer in writers:
            writer.add_image("views/tag_pass_len", chart, step, dataformats="HWC")
            for tag in range(num_tags):
                if lengths[tag].size:
                    writer.add_histogram(f"views/tag{tag + 1}/len", lengths[tag], step)
                if shown:
                    writer.add_text(f"samples/tag{tag + 1}", samples_table(shown, tag, self.max_chars), step)
