"""Ctrl-C / SIGTERM during training: stop promptly, with a checkpoint once training has started.

The handlers are installed by the entry point before the model loads (:mod:`npft_lightning.core.interrupt`).
During the fit this callback defers them: a signal only records the stop request, so the training
step in flight finishes; the run then stops at the first of

* the end of the current optimizer step: ``<checkpoints>/last.ckpt`` is written where
  ``ModelCheckpoint`` writes its periodic ones (exact resume);
* a :func:`~npft_lightning.core.interrupt.check` in a long loop (outlier scoring, calibration, the
  validation and fake-quant passes, the curvature probe): the weights those loops change are put
  back by their ``finally`` blocks, and the checkpoint holds the state after the last finished step
  (Lightning reruns an interrupted validation on resume).

Lightning's own Ctrl-C handling raises ``KeyboardInterrupt`` wherever the program is and exits
without a checkpoint; its SIGTERM handling waits for the end of the next training step or
validation batch (it still runs beside this one and may be the one that stops the run: the
checkpoint is written either way).
"""

from __future__ import annotations

import shlex
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from npft_lightning.core import interrupt


class GracefulInterrupt(Callback):
    """On the first Ctrl-C or SIGTERM: stop at the next step boundary or loop check, write
    ``<checkpoints>/last.ckpt`` if a training step has been made, and leave the line that says how to resume
    for the entry point to print (:func:`~npft_lightning.core.interrupt.outcome`).

    A second signal stops at once, without saving. Under DDP every rank gets the terminal's SIGINT
    (and Lightning forwards SIGTERM to the ranks it started); the ranks OR their requests at each
    step boundary, so all stop after the same step and write one checkpoint together. A stop
    inside a loop check writes a checkpoint only in a single process (a checkpoint is a collective
    under DDP, and the other ranks may be elsewhere); under DDP the last periodic one is the resume point.

    Args:
        resume_args: the command line that reruns this job, without ``ckpt_path`` and ``hydra.run.dir``
            (which are appended); None gives only the checkpoint path.
        run_dir: the run's output folder (``hydra.run.dir`` of the resumed run).
    """

    def __init__(self, resume_args: list[str] | None = None, run_dir: str | None = None):
        self.resume_args = resume_args
        self.run_dir = run_dir
        self._deferred = ExitStack()
        self._step_at_batch_start = -1
        self._saved_step: int | None = None  # the global step of the checkpoint written on request
        self._stop = False  # a checkpoint was written on request: raise at the next hook

    # ----------------------------------------------------------------------------- the hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not interrupt.installed():  # a worker spawned by ddp_spawn: the entry point ran in the parent
            interrupt.install()
        self._saved_step, self._stop = None, False
        self._deferred.enter_context(interrupt.deferred())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop_if_saved()
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start or self._stop:
            return  # mid gradient accumulation: the optimizer step is not complete yet
        requested = interrupt.received() is not None
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if requested:
            # Saved here, where ModelCheckpoint saves its periodic checkpoints (exact resume), but the run
            # stops at the next hook: Lightning logs this step's metrics after on_train_batch_end.
            self._save(trainer)
            self._stop = True

    def _stop_if_saved(self) -> None:
        if self._stop:
            self._stop = False
            raise interrupt.Interrupted(interrupt.received() or signal.SIGINT)  # another rank's request under DDP

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._deferred.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._deferred.close()
        signum = interrupt.received()
        # Lightning's SIGTERM handling ends the fit with its own SIGTERMException (a SystemExit).
        stopped = isinstance(exception, interrupt.Interrupted) or (signum is not None and isinstance(exception, SystemExit))
        if not stopped:
            return
        if self._saved_step is None and not getattr(exception, "forced", False) and trainer.global_step > 0:
            if trainer.world_size == 1:
                self._save(trainer)
            else:
                last = checkpoint_dir(trainer) / "last.ckpt"
                interrupt.set_outcome(f" after step {trainer.global_step}, outside a training step; under DDP only a step boundary "
                                      f"saves a checkpoint: resume from the last periodic one, {last}")

    def _save(self, trainer: pl.Trainer) -> None:
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # through the trainer's (atomic) checkpoint IO; rank 0 writes
        self._saved_step = trainer.global_step
        message = f" after step {trainer.global_step}; checkpoint saved to {path}"
        if _training_done(trainer):
            # A resumed fit with no steps left skips the end-of-training evaluations (Lightning runs no
            # train hooks then), so the way on is the adapter of the final step, scored by eval.py.
            interrupt.set_outcome(f"{message}; training had finished, the final evaluation was interrupted: export the "
                                  f"adapter with python -m npft_lightning export {shlex.quote(str(path))} and score it "
                                  f"with python eval.py adapter={shlex.quote(str(path.with_name(path.stem + '_adapter')))}")
            return
        if self.resume_args is not None:
            command = [*self.resume_args, f"ckpt_path={path}", f"hydra.run.dir={self.run_dir}"]
            message += "; resume with: " + " ".join(shlex.quote(a) for a in command)
        interrupt.set_outcome(message)


def _training_done(trainer: pl.Trainer) -> bool:
    """Whether no training step is left (the run stopped in the end-of-training evaluations)."""
    try:
        return bool(trainer.fit_loop.done)
    except Exception:  # noqa: BLE001 - a loop not set up yet has steps left
        return False


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where this run's checkpoints go: the ``ModelCheckpoint`` folder, else ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"
