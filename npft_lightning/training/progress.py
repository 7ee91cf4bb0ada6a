"""A Rich progress bar whose training total is the steps the run will actually take.

Lightning's bar counts the epoch's batches unless ``max_epochs=-1``: a 16-step run (NPFT as first built,
``experiment=npft_fisher``) of a 936-batch epoch showed ``16/936`` and a three-hour estimate. Here the total stops at ``max_steps``.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class StepLimitedRichProgressBar(RichProgressBar):
    _start: tuple[int, int] = (0, 0)  # (global step, batches already done in the epoch) when the epoch began

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Taken before the bar reads its total; a run resumed mid-epoch starts past batch 0.
        self._start = (trainer.global_step, trainer.fit_loop.epoch_loop.batch_progress.current.completed)
        super().on_train_epoch_start(trainer, pl_module)

    @property
    def total_train_batches(self) -> int | float:
        total = super().total_train_batches
        trainer = self.trainer
        if trainer.max_steps is None or trainer.max_steps < 0:
            return total
        step, done = self._start
        return min(total, done + (trainer.max_steps - step) * trainer.accumulate_grad_batches)
