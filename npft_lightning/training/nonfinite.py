"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

A NaN loss (a bad batch, an overflow, a noise draw that breaks the forward pass) would otherwise
write NaN into the adapters and AdamW's moments, and every later step and checkpoint would carry it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from npft_lightning.core.errors import UserError


class NonFiniteGuard(Callback):
    """Drops the update of any optimizer step whose loss or gradients hold NaN/inf, and counts it.

    The check runs after backward and before ``optimizer.step`` (``on_before_optimizer_step``).
    A bad step's gradients are set to ``None``: AdamW leaves parameters without a gradient alone
    (no weight change, no moment update, no step count). The step still counts towards
    ``trainer.max_steps`` and the LR schedule, so a run cannot loop forever on bad batches.
    ``train/skipped_nonfinite`` logs the running count. After ``max_consecutive`` bad steps in a
    row the run stops with one line; the checkpoints already written are left as they are (the
    skipped steps changed nothing, so they still hold good weights). ``max_consecutive=0`` never stops.

    Under DDP the gradients are already averaged across ranks (a NaN anywhere is a NaN everywhere)
    and the loss flag is OR-reduced, so all ranks skip the same steps. With fp16 mixed precision the
    gradient scaler itself skips overflowing steps and lowers its scale; only a non-finite loss counts then.
    """

    def __init__(self, max_consecutive: int = 5):
        if int(max_consecutive) < 0:
            raise UserError(f"max_nonfinite_steps={max_consecutive} must be >= 0 (0 = never stop)")
        self.max_consecutive = int(max_consecutive)
        self.skipped = 0
        self.consecutive = 0
        self._streak_start: int | None = None
        self._loss_bad: Tensor | bool = False

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # Once per micro-batch: one bad micro-batch spoils the accumulated gradient of the step.
        self._loss_bad = torch.logical_or(torch.as_tensor(self._loss_bad, device=loss.device), ~torch.isfinite(loss.detach()))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.as_tensor(self._loss_bad)
        self._loss_bad = False
        if params and getattr(trainer.precision_plugin, "scaler", None) is None:
            norms = torch._foreach_norm([p.grad for p in params])
            bad = bad.to(norms[0].device) | ~torch.isfinite(torch.stack(norms)).all()
        bad = bool(bad)  # one host sync per step
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            for p in params:
                p.grad = None
            self.skipped += 1
            self.consecutive += 1
            if self._streak_start is None:
                self._streak_start = trainer.global_step
            rank_zero_warn(f"step {trainer.global_step}: the loss or its gradients are not finite; skipped the update "
                           f"({self.consecutive} in a row, {self.skipped} in all)")
        else:
            self.consecutive = 0
            self._streak_start = None
        pl_module.log("train/skipped_nonfinite", float(self.skipped), on_step=True, on_epoch=False)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise UserError(
                f"training stopped: the loss was not finite for {self.consecutive} steps in a row "
                f"(steps {self._streak_start}-{trainer.global_step}, no update made); {_last_checkpoint(trainer)}; "
                f"lower optimizer.lr or noise.scale, check the data, or raise max_nonfinite_steps"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive, "streak_start": self._streak_start}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
        self._streak_start = state_dict.get("streak_start")


def _last_checkpoint(trainer: pl.Trainer) -> str:
    callback = trainer.checkpoint_callback
    last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    if last and Path(last).is_file():
        return f"the last checkpoint, {last}, holds the weights before them"
    return "no checkpoint was written before them"
