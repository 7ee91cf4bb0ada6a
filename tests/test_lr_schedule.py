"""The learning-rate schedule (transformers' warm-up + decay schedulers behind ``schedule.lr_decay``)."""

import math

import pytest
import torch

from npft_lightning.training.lr_schedule import lr_scheduler


def lr_per_step(total: int, warmup: int, decay: str, lr: float = 1.0) -> list[float]:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = lr_scheduler(optimizer, total, warmup_steps=warmup, decay=decay)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_no_warmup_linear_decays_from_the_peak_to_zero():
    lrs = lr_per_step(8, 0, "linear")
    assert lrs == [1 - k / 8 for k in range(8)]


def test_warmup_ramps_from_zero_to_the_peak_then_decays():
    lrs = lr_per_step(12, 4, "linear")
    assert lrs[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert lrs[5:] == pytest.approx([1 - k / 8 for k in range(1, 8)])


def test_cosine_is_half_way_at_the_middle_of_the_decay():
    lrs = lr_per_step(10, 2, "cosine")
    assert lrs[2] == 1.0
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_constant_holds_the_peak_after_warmup():
    assert lr_per_step(6, 2, "constant") == [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]


def test_unknown_decay_is_refused():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="linear, cosine, constant"):
        lr_scheduler(optimizer, 4, decay="step")
