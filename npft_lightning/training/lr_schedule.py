"""The learning-rate schedule: transformers' warm-up + decay schedulers, named by ``schedule.lr_decay``."""

from __future__ import annotations

import torch
from transformers import get_scheduler

# schedule.lr_decay -> transformers' scheduler: linear warm-up over ``warmup_steps`` (from 0), then the decay.
LR_DECAYS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def lr_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0, decay: str = "linear"
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-optimizer-step scheduler: warm-up, then ``linear`` / ``cosine`` decay to 0 at ``total_steps``, or ``constant``."""
    if decay not in LR_DECAYS:
        raise ValueError(f"lr decay={decay!r} is not one of {', '.join(LR_DECAYS)}")
    return get_scheduler(LR_DECAYS[decay], optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
