"""The one interface every quantizer implements, and the exact-restore context around it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn


class WeightQuantizer:
    """A weight-only fake quantizer.

    Weight-local quantizers (RTN, NF4, cube-root, k-means) implement :meth:`quantize_weight`.
    Quantizers that need activations (GPTQ) override :meth:`quantize_model`, which by default
    quantizes each linear on its own. ``name`` is the key used in logs (``val/ppl_<name>``).
    """

    name: str = "quantizer"
    needs_calibration: bool = False

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """Fake-quantized copy of one weight matrix [out_features, in_features]."""
        raise NotImplementedError

    @torch.no_grad()
    def quantize_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> None:
        """Replace, in place, the weights of ``linears`` (canonical name -> Linear) by their fake-quantized values."""
        for name, linear in linears.items():
            linear.weight.copy_(self.quantize_weight(linear.weight.float(), name=name).to(linear.weight.dtype))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


@contextmanager
def weights_restored(linears: Mapping[str, nn.Linear]) -> Iterator[None]:
    """Keep a copy of the weights of ``linears`` and put it back, bit for bit, on exit."""
    originals = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(originals[name])


@contextmanager
def fake_quantized(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer,
    deltas: Mapping[str, Tensor] | None = None,
    calibration: Tensor | None = None,
) -> Iterator[None]:
    """Within the block, ``linears`` hold ``Q(W + delta)``; on exit the exact original ``W``.

    ``deltas`` are the merged adapter updates (LoRA ``B @ A * scaling``), so the quantizer sees
    the weights a user would export; the caller disables the adapters meanwhile.
    """
    with weights_restored(linears):
        with torch.no_grad():
            for name, delta in (deltas or {}).items():
                linears[name].weight.add_(delta.to(linears[name].weight.dtype))
        quantizer.quantize_model(model, linears, calibration)
        yield
