"""The training progress bar counts the steps the run will take, not the whole epoch."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.demos.boring_classes import BoringModel

from npft_lightning.training.progress import StepLimitedRichProgressBar


class RecordingBar(StepLimitedRichProgressBar):
    def __init__(self):
        super().__init__()
        self.totals: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.totals.append(self.total_train_batches)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)


def fit(tmp_path, **trainer_kwargs) -> RecordingBar:
    bar = RecordingBar()
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[bar], logger=False, enable_checkpointing=False,
                         limit_val_batches=0, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(BoringModel())  # 64 training batches per epoch
    return bar


def test_total_is_max_steps_not_the_epoch(tmp_path):
    assert set(fit(tmp_path, max_epochs=1, max_steps=5).totals) == {5}


def test_total_counts_micro_batches_under_accumulation(tmp_path):
    assert set(fit(tmp_path, max_epochs=1, max_steps=3, accumulate_grad_batches=2).totals) == {6}


def test_without_max_steps_the_epoch_is_the_total(tmp_path):
    assert set(fit(tmp_path, max_epochs=1, limit_train_batches=7).totals) == {7}


def test_enable_progress_bar_false_drops_the_bar_callback():
    """trainer.enable_progress_bar=false wins over callbacks.rich_progress_bar (Lightning would refuse the pair)."""
    from helpers import compose

    from npft_lightning.tasks.build import build_quantizers
    from npft_lightning.tasks.train import build_callbacks

    for flag, expected in (("true", 1), ("false", 0)):
        cfg = compose("train", "model=tiny-llama", "paths.output_dir=/tmp", f"trainer.enable_progress_bar={flag}")
        callbacks, _ = build_callbacks(cfg, build_quantizers(cfg))
        assert sum(isinstance(c, StepLimitedRichProgressBar) for c in callbacks) == expected
        pl.Trainer(**{k: v for k, v in cfg.trainer.items() if k not in ("_target_", "default_root_dir")}, callbacks=callbacks)
