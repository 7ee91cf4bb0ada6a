"""A model scored under a quantizer: the one step behind ``eval.py``, ``analyze.py`` and the fake-quant
validation of ``train.py``.

Hand the quantizer its calibration, write Q(W + ΔW) into the decoder linears (ΔW: the adapters'
updates when they are not merged yet), score, put W back bit for bit. The callers differ only in
what they score (splits and files, rows of a sweep, a DDP-summed validation NLL), so the numbers of
the three agree for the same model, quantizer and windows.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Callable, Mapping, TypeVar

import torch
from torch import Tensor, nn

from npft_lightning.quant.base import WeightQuantizer, fake_quantized
from npft_lightning.quant.calibration import Calibration

Score = TypeVar("Score")


def score_quantized(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer | None,
    score: Callable[[], Score],
    calibration: Calibration | None = None,
    deltas: Mapping[str, Tensor] | None = None,
    adapters_disabled: Callable[[], AbstractContextManager] = nullcontext,
    sizes: dict | None = None,
) -> Score:
    """``score()`` while ``linears`` hold their weights quantized by ``quantizer``; the weights are
    restored bit-exactly after, also when quantizing or scoring raises. ``quantizer=None``: ``score()``
    of the model as it is.

    ``calibration``: what the quantizer needs (windows, the Fisher), see
    :class:`~npft_lightning.quant.calibration.Calibration`. ``deltas``: the merged updates of adapters
    the model still carries, quantized with the weights while ``adapters_disabled()`` switches the
    adapters off (the Fisher is taken before, adapters on). ``sizes``: filled with the stored size and
    bits per weight (:func:`~npft_lightning.quant.base.fake_quantized`).
    """
    if quantizer is None:
        return score()
    with ExitStack() as stack:
        windows = stack.enter_context((calibration or Calibration()).given_to(quantizer, model, linears))
        stack.enter_context(adapters_disabled())
        # Lightning validates in inference mode; quantizers that take gradients (ReQuant's Fisher and PQI) need it off.
        with torch.inference_mode(False):
            stack.enter_context(fake_quantized(model, linears, quantizer, deltas, windows, sizes))
        return score()
