"""A CSV logger whose log survives a resume: the resumed run continues the same ``metrics.csv``.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` in its folder when it starts, so a run
resumed into its own folder (``ckpt_path=... hydra.run.dir=<run>``) would lose the rows of the
steps before the interruption. Here the existing rows are kept, the rows the interrupted run logged
after its checkpoint are dropped (the resumed run logs those steps again), and the file is always
rewritten atomically, so a crash mid-write leaves the previous log.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from npft_lightning.core.io import atomic_write_text


class _ResumableWriter(ExperimentWriter):
    """Keeps the rows of an existing ``metrics.csv`` and writes the whole file atomically on each save."""

    def __init__(self, log_dir: str) -> None:
        self.previous_rows: list[dict[str, str]] = []  # rows of an earlier run in this folder
        self.rows: list[dict[str, Any]] = []  # rows of this run already saved
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:
        # Instead of Lightning's "previous log files will be deleted": read them back.
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.previous_rows = list(reader)
                self.metrics_keys = sorted(reader.fieldnames or [])

    def resume_at(self, step: int) -> None:
        """Keep only the earlier run's rows logged before ``step`` (the restored global step)."""
        self.previous_rows = [row for row in self.previous_rows if _step(row) < step]

    def save(self) -> None:
        if self.metrics:
            self._record_new_keys()
        self.rows.extend(self.metrics)
        self.metrics = []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys, restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.previous_rows)
        writer.writerows(self.rows)
        atomic_write_text(self.metrics_file_path, buffer.getvalue())


def _step(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or 0)
    except ValueError:
        return 0.0


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the ``metrics.csv`` of its folder instead of replacing it (see the module doc).

    Give it a fixed ``version`` (``conf/logger/csv.yaml`` uses ``""``: the file is ``<run>/csv/metrics.csv``),
    so that a resumed run finds the same folder. :class:`AlignLogOnResume` drops the rows logged after the checkpoint.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> _ResumableWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ResumableWriter(log_dir=self.log_dir)
        return self._experiment


class AlignLogOnResume(Callback):
    """At train start (after a checkpoint is restored), cut the earlier rows of each resumable CSV log at the global step.

    A fresh run into a folder with an old log starts at step 0 and so replaces it; a resumed run keeps
    the rows before its checkpoint's step and logs the rest again.
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, ResumableCSVLogger) and trainer.is_global_zero:
                logger.experiment.resume_at(trainer.global_step)
