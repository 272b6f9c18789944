"""Lightning callbacks of the projection's training: the small projection folder analyses load,
written with every checkpoint, and a clock of the time spent in training steps."""

from __future__ import annotations

import time
from pathlib import Path

import lightning.pytorch as L
from lightning.pytorch.callbacks import Callback

from mmn.training.module import ProjectionTraining


class ProjectionExport(Callback):
    """Writes run_dir/projection/ (the small checkpoint analyses load) with every full checkpoint
    and at the end of training, from the first process only."""

    def __init__(self, folder: Path, provenance: dict):
        self.folder, self.provenance = folder, provenance

    def export(self, trainer: L.Trainer, module: ProjectionTraining) -> None:
        if trainer.is_global_zero:
            module.projection.save(self.folder, metadata={**self.provenance, "step": trainer.global_step})

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.export(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module)


class TrainingClock(Callback):
    """Seconds spent in training steps (data waiting included, validation excluded)."""

    def __init__(self):
        self.seconds, self.steps, self._started = 0.0, 0, None

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index) -> None:
        self.seconds += time.perf_counter() - self._started
        self.steps += 1
        self._started = time.perf_counter()  # waiting for the next batch counts as training time
