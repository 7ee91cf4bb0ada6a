"""Run plumbing around the NPFT callbacks: the step clock, ``metrics.json`` and the adapter at the end of fit,
and a checkpoint writer that never leaves a truncated file."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.io import atomic_dir, atomic_file, atomic_write_json
from npft_lightning.training.callbacks import (
    CurvatureProbe,
    FakeQuantValidation,
    ImportanceWeighting,
    OutlierSelection,
)


class StepClock(Callback):
    """Wall time of the training: in total, and per batch as the time between consecutive batch ends.

    Measured between batch ends so that everything a step costs is inside (data, the noise draw and
    restore, forward, backward, optimizer); the first batch (warm-up) has no interval. Benchmarks
    compare these times between runs made one after the other on the same machine.
    """

    def __init__(self) -> None:
        self.batch_seconds: list[float] = []
        self.train_seconds: float | None = None
        self._started: float | None = None
        self._last: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started, self._last = time.perf_counter(), None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.batch_seconds.append(now - self._last)
        self._last = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._started is not None:
            self.train_seconds = time.perf_counter() - self._started

    def summary(self) -> dict[str, float | None]:
        """``train_seconds`` (this process's training, resumed parts not included) and ``median_batch_seconds``."""
        median = statistics.median(self.batch_seconds) if self.batch_seconds else None
        return {"train_seconds": self.train_seconds, "median_batch_seconds": median}


def collect_metrics(trainer: pl.Trainer) -> dict[str, Any]:
    """``{"ppl": {"before": {...}, "after": {...}}, "curvature": {...}, "outliers": {...}, "imatrix": {...}, "train": {...}}``.

    Read from the NPFT callbacks of ``trainer`` (those absent are left out).
    """
    found = {type(c): c for c in trainer.callbacks}
    metrics: dict[str, Any] = {"ppl": found[FakeQuantValidation].results if FakeQuantValidation in found else {}}
    if FakeQuantValidation in found and found[FakeQuantValidation].errors:
        metrics["quant_errors"] = found[FakeQuantValidation].errors
    if CurvatureProbe in found:
        metrics["curvature"] = found[CurvatureProbe].results
    if ImportanceWeighting in found:
        metrics["imatrix"] = found[ImportanceWeighting].summary()
    if OutlierSelection in found:
        masks = found[OutlierSelection].masks
        metrics["outliers"] = {"count": sum(mask_ops.count(m) for m in masks.values()), "matrices": len(masks)}
    loss = trainer.callback_metrics.get("train/loss")
    metrics["train"] = {
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "last_loss": None if loss is None else float(loss),
        "world_size": trainer.world_size,
    }
    if StepClock in found:
        metrics["train"].update(found[StepClock].summary())
    return metrics


class RunArtifacts(Callback):
    """Writes ``metrics.json`` and the PEFT adapter at the end of fit, on global rank 0 of the training processes.

    A callback rather than code after ``trainer.fit``: under ``ddp_spawn`` the trained adapters and
    the callbacks' results live in the spawned workers, and the process that called ``fit`` gets
    back only the weights and ``callback_metrics``, not the NPFT callbacks' before/after tables.
    Written here, the files are right whichever strategy ran. The adapter is written first, so an
    existing ``metrics.json`` marks a finished run. ``metrics`` is set on every rank (no collectives).
    """

    def __init__(self, output_dir: str | os.PathLike, config: dict[str, Any] | None = None, save_adapter: bool = True):
        self.output_dir = Path(output_dir)
        self.config = config
        self.save_adapter = save_adapter
        self.metrics: dict[str, Any] | None = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = collect_metrics(trainer)
        if self.config is not None:
            metrics["config"] = self.config
        if trainer.is_global_zero:
            if self.save_adapter:
                with atomic_dir(self.output_dir / "adapter") as tmp:  # a crash never leaves half an adapter
                    pl_module.model.save_pretrained(str(tmp))
            atomic_write_json(self.output_dir / "metrics.json", metrics)
        self.metrics = metrics


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, but a crash or SIGKILL mid-write never leaves a truncated checkpoint.

    Lightning's own save writes through an fsspec transaction whose temporary file lives in the
    system temp dir: on another file system (a tmpfs /tmp, a cluster's scratch) the final "move" is
    a copy into the destination, which a kill can cut short, and nothing is fsynced. Here the write goes
    through :func:`~npft_lightning.core.io.atomic_file` (a temporary file beside the checkpoint, fsynced, renamed).
    Remote paths (s3://, ...) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path) as tmp:
            torch.save(checkpoint, tmp)
