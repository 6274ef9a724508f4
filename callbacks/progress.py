"""``GenerationProgress``: show how far sampling has got on Lightning's progress bar.

Evaluation (every tag of every question) and RL rollouts generate in chunks of
``generation_batch_size`` sequences; a validation batch can take minutes. The module reports
progress through a callback hook of its own: after each chunk the generation engine calls
``on_generation_progress(trainer, pl_module, done, total)`` of every trainer callback that has it
(:func:`forklight.rollout.callback_progress`). This one writes
``generating done/total`` (sequences) on the active bar (train, validation, test or predict):
the postfix of a ``TQDMProgressBar`` bar, the description of a ``RichProgressBar`` task (the
default bar when ``rich`` is installed). With no progress bar it does nothing. It only observes:
sampling is the same with or without it.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

_TQDM_BAR = {"train": "train_progress_bar", "sanity_check": "val_progress_bar", "validate": "val_progress_bar",
             "test": "test_progress_bar", "predict": "predict_progress_bar"}
_RICH_TASK = {"train": "train_progress_bar_id", "sanity_check": "val_sanity_progress_bar_id",
              "validate": "val_progress_bar_id", "test": "test_progress_bar_id", "predict": "predict_progress_bar_id"}
_SUFFIX = " · generating "


class GenerationProgress(L.Callback):
    def __init__(self) -> None:
        """Generation progress (sequences done / total) on the progress bar."""

    def on_generation_progress(self, trainer: L.Trainer, pl_module: L.LightningModule, done: int, total: int) -> None:
        """Called after each chunk of sequences generated; clears the note when ``done == total``."""
        if not trainer.is_global_zero or trainer.state.stage is None:
            return
        stage, bar_callback = trainer.state.stage.value, trainer.progress_bar_callback
        note = f"{done}/{total}" if done < total else None
        if isinstance(bar_callback, TQDMProgressBar) and stage in _TQDM_BAR:
            try:
                bar = getattr(bar_callback, _TQDM_BAR[stage])
            except TypeError:  # that bar does not exist (yet)
                return
            if bar is not None and not getattr(bar, "disable", False):
                bar.set_postfix_str(f"generating {note}" if note else "", refresh=True)
        elif isinstance(bar_callback, RichProgressBar) and stage in _RICH_TASK and bar_callback.progress is not None:
            task_id = getattr(bar_callback, _RICH_TASK[stage], None)
            if task_id is None:
                return
            base = bar_callback.progress.tasks[task_id].description.split(_SUFFIX)[0]
            bar_callback.progress.update(task_id, description=base + _SUFFIX + note if note else base)
            bar_callback.refresh()
