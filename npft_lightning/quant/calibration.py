"""What a quantizer is handed besides the weights: calibration windows and the model's Fisher.

Quantizers that run the model (GPTQ, ReQuant: ``needs_calibration``) get token windows;
sensitivity-weighted quantizers left without scores (k-means, dense-and-sparse, ReQuant: a
``sensitivity`` attribute that is None) get the diagonal Fisher of the model they quantize. The
windows are ``conf/calibration/default.yaml``'s, the same for the fake-quant validation of
``train.py``, ``eval.py`` and ``analyze.py``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Protocol

import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.gradients import fisher_diagonal
from npft_lightning.quant.base import WeightQuantizer


def needs_windows(quantizer: WeightQuantizer | None) -> bool:
    """Whether ``quantizer`` runs the model on calibration windows (GPTQ, ReQuant)."""
    return quantizer is not None and quantizer.needs_calibration


def needs_fisher(quantizer: WeightQuantizer | None) -> bool:
    """Whether ``quantizer`` weights by sensitivity and was given none: it gets the model's Fisher."""
    return quantizer is not None and getattr(quantizer, "sensitivity", False) is None


@dataclass(frozen=True)
class CalibrationSpec:
    """Which windows: ``windows`` windows of ``length`` tokens at random offsets of the train split,
    drawn with ``seed``, for quantizers that run the model; ``sensitivity_windows`` windows of the
    same length and seed for the Fisher."""

    windows: int
    length: int
    seed: int
    sensitivity_windows: int


class WindowSource(Protocol):
    """Where windows are drawn from (:class:`~npft_lightning.lm.datamodule.CausalLMDataModule`)."""

    def calibration_windows(self, n: int, length: int, seed: int = 0) -> Tensor: ...


class Calibration:
    """The calibration of one scoring pass, shared by the quantizers of the pass.

    ``windows`` [n, L]: for quantizers that run the model. ``fisher_windows`` [n, L]: the Fisher's,
    computed for the first quantizer that needs it, of the model as it is then (unquantized), and
    reused by the others; build a new one when the model changes (a later validation).
    """

    def __init__(self, windows: Tensor | None = None, fisher_windows: Tensor | None = None):
        self.windows = windows
        self.fisher_windows = fisher_windows
        self._fisher: dict[str, Tensor] | None = None

    @classmethod
    def drawn(cls, source: WindowSource, spec: CalibrationSpec | None, quantizers: Iterable[WeightQuantizer | None],
              device: Any = None) -> Calibration:
        """The windows ``quantizers`` need, drawn from ``source`` by ``spec`` onto ``device``; None for what none needs."""
        quantizers = list(quantizers)
        if spec is None:
            needy = [q.name for q in quantizers if needs_windows(q) or needs_fisher(q)]
            if needy:
                raise UserError(f"quant={needy[0]} needs calibration windows of the train split, but the calibration group "
                                "was removed; keep it (calibration=default) or choose a quantizer that needs none")
            return cls()

        def draw(n: int) -> Tensor:
            return source.calibration_windows(n, spec.length, seed=spec.seed).to(device)

        return cls(draw(spec.windows) if any(map(needs_windows, quantizers)) else None,
                   draw(spec.sensitivity_windows) if any(map(needs_fisher, quantizers)) else None)

    def fisher(self, model: nn.Module, linears: Mapping[str, nn.Linear]) -> dict[str, Tensor]:
        """The diagonal Fisher of ``linears`` on ``fisher_windows`` (computed on the first call)."""
        if self._fisher is None:
            if self.fisher_windows is None:
                raise ValueError("a sensitivity-weighted quantizer needs the model's Fisher: give the calibration fisher_windows")
            # Lightning validates in inference mode; the Fisher needs gradients. With unmerged LoRA
            # adapters on, dL/dW is the gradient of the merged weight: the Fisher of the merged model.
            with torch.inference_mode(False), torch.enable_grad():
                self._fisher = fisher_diagonal(model, linears, self.fisher_windows)
        return self._fisher

    @contextmanager
    def given_to(self, quantizer: WeightQuantizer, model: nn.Module, linears: Mapping[str, nn.Linear]) -> Iterator[Tensor | None]:
        """Within the block ``quantizer`` holds the Fisher if it needs one, and takes none again on exit;
        yields its calibration windows (None for a quantizer that does not run the model)."""
        if needs_windows(quantizer) and self.windows is None:
            raise ValueError(f"quantizer {quantizer.name} runs the model on calibration windows: give the calibration windows")
        borrowed = needs_fisher(quantizer)
        if borrowed:
            quantizer.sensitivity = self.fisher(model, linears)
        try:
            yield self.windows if needs_windows(quantizer) else None
        finally:
            if borrowed:
                quantizer.sensitivity = None
