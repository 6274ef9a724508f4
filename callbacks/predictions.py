"""``PredictionWriter``: write ``forklight predict`` results as jsonl in the run directory.

One line per completion: ``id``, ``tag`` (its name), ``tag_index``, ``tag_prob`` (the model's
pi(tag | prompt)), ``chosen_by`` (``all``, or the ``fork_policy`` that picked the tag), ``sample``,
``completion``, ``answer`` (extracted), ``gold``, ``score`` (verifier; null without a gold answer),
``length`` (tokens), ``default_tag``.
"""

from __future__ import annotations

import json
import os

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


class PredictionWriter(BasePredictionWriter):
    def __init__(self, path: str | None = None) -> None:
        """Write predictions as they are made.

        Args:
            path: output jsonl; default ``<run dir>/predictions.jsonl`` (``.rank{r}`` added on ranks > 0).
        """
        super().__init__(write_interval="batch")
        self.path = path
        self._opened: str | None = None

    def _file(self, trainer: L.Trainer) -> str:
        path = self.path or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions.jsonl")
        return path if trainer.global_rank == 0 else f"{path}.rank{trainer.global_rank}"

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._opened = self._file(trainer)
        os.makedirs(os.path.dirname(os.path.abspath(self._opened)), exist_ok=True)
        open(self._opened, "w").close()

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        with open(self._opened, "a") as handle:
            for row in prediction:
                handle.write(json.dumps(row) + "\n")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank_zero_info(f"forklight: predictions written to {self._opened}")
