"""Ctrl-C during training: finish the current step, save a checkpoint, say how to resume.

Lightning's own Ctrl-C handling raises ``KeyboardInterrupt`` wherever the program is (mid-step,
mid-validation) and exits without a checkpoint, so everything since the last periodic checkpoint
is lost. Here the first SIGINT only raises a flag; the run stops at the next optimizer-step
boundary, where a checkpoint is exact (the same place ``ModelCheckpoint`` writes its periodic ones).
"""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from npft_lightning.core.errors import RunInterrupted


class GracefulInterrupt(Callback):
    """On the first Ctrl-C: stop after the current optimizer step, write ``<checkpoints>/last.ckpt``, print the resume command.

    A second Ctrl-C stops at once, without saving (Python's default). Under DDP every rank gets
    the terminal's SIGINT; the ranks OR their flags at each step boundary, so all stop after the
    same step and write one checkpoint together.

    Args:
        resume_args: the command line that reruns this job, without ``ckpt_path`` and ``hydra.run.dir``
            (which are appended); None prints only the checkpoint path.
        run_dir: the run's output folder (``hydra.run.dir`` of the resumed run).
    """

    def __init__(self, resume_args: list[str] | None = None, run_dir: str | None = None):
        self.resume_args = resume_args
        self.run_dir = run_dir
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._step_at_batch_start = -1
        self._saved: tuple[Path, int] | None = None  # the checkpoint written on request, until the run stops

    # ----------------------------------------------------------------------------- the signal
    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:  # second Ctrl-C: the user means now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after the current training step and saving a checkpoint "
              "(press Ctrl-C again to stop at once, without saving)", file=sys.stderr, flush=True)

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread() and not self._installed:
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def _restore(self) -> None:
        if self._installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.default_int_handler)
            self._installed = False

    # ----------------------------------------------------------------------------- the hooks
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # From fit start: a Ctrl-C during outlier scoring or the first fake-quant pass also waits for step 1.
        self.requested = False
        self._saved = None
        self._install()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._stop_if_saved(trainer)
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self._step_at_batch_start or self._saved is not None:
            return  # mid gradient accumulation: the optimizer step is not complete yet
        requested = self.requested
        if trainer.world_size > 1:
            requested = trainer.strategy.reduce_boolean_decision(requested, all=False)
        if not requested:
            return
        # Saved here, where ModelCheckpoint saves its periodic checkpoints (exact resume), but the run
        # stops at the next hook: Lightning logs this step's metrics after on_train_batch_end.
        path = checkpoint_dir(trainer) / "last.ckpt"
        trainer.save_checkpoint(path)  # through the trainer's (atomic) checkpoint IO; rank 0 writes
        self._saved = (path, trainer.global_step)

    def _stop_if_saved(self, trainer: pl.Trainer) -> None:
        if self._saved is None:
            return
        path, step = self._saved
        self._saved = None
        message = f"interrupted after step {step}; checkpoint saved to {path}"
        if self.resume_args is not None:
            command = [*self.resume_args, f"ckpt_path={path}", f"hydra.run.dir={self.run_dir}"]
            message += "; resume with: " + " ".join(shlex.quote(a) for a in command)
        if trainer.is_global_zero:
            print(message, file=sys.stderr, flush=True)
        raise RunInterrupted(message)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_if_saved(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Ctrl-C during the last step: the end-of-training evaluations (earlier callbacks) have run by
        # now, so stopping would only throw them away. The run finishes; last.ckpt is an extra.
        self._saved = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()


def checkpoint_dir(trainer: pl.Trainer) -> Path:
    """Where this run's checkpoints go: the ``ModelCheckpoint`` folder, else ``<default_root_dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"


