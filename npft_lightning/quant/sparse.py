"""Dense-and-sparse decomposition (SqueezeLLM) around any quantizer.

The top ``keep_ratio`` percent of each matrix (by sensitivity, or by |w| when no sensitivity is
given) is kept in full precision (the sparse part); the rest, with the kept entries set to 0, is
quantized by the base quantizer (the dense part); the kept values are then written back. Zeroing
them first takes the outliers out of the dense part's range (RTN, NF). A base quantizer with
a ``sensitivity`` attribute (k-means) also gets zero weight at the kept positions, so they do not
pull its centroids. GPTQ instead keeps them at their exact values while it runs (see :func:`encode_dense`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from npft_lightning.core.restore import weights_restored
from npft_lightning.core.topk import top_fraction_mask
from npft_lightning.quant.base import WeightQuantizer, quantize_encoded

# Fields the sparse part adds to the base quantizer's stored form.
SPARSE_FIELDS = ("sparse_index", "sparse_value")




class SparseParts(WeightQuantizer):
    """A quantizer whose stored form is ``base``'s dense fields plus one sparse part (``sparse_index``,
    ``sparse_value``): subclasses say in :meth:`encode_model` which entries the sparse part holds."""

    base: WeightQuantizer

    @property
    def stores_weights(self) -> bool:
        return self.base.stores_weights

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return decode_dense_and_sparse(self.base, payload)

    @torch.no_grad()
    def quantize_model(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None = None) -> None:
        quantize_encoded(model, linears, self, calibration)


class DenseAndSparse(SparseParts):
    """Keep the most sensitive ``keep_ratio`` % of each matrix exact; quantize the rest with ``base``.

    Set ``sensitivity`` (canonical name -> scores shaped like the weight, e.g. NPFT's Fisher) to
    pick the kept entries; |w| is used for matrices without scores, and for all of them with
    ``selector="magnitude"``. If the base quantizer has its own ``sensitivity`` attribute left as
    None, it is given these scores too.
    """

    SELECTORS = ("sensitivity", "magnitude")

    def __init__(self, base: WeightQuantizer, keep_ratio: float = 0.45, name: str | None = None,
                 selector: str = "sensitivity"):
        if not 0 <= float(keep_ratio) <= 100:
            raise ValueError(f"keep_ratio={keep_ratio} is a percentage; use a value in [0, 100]")
        if selector not in self.SELECTORS:
            raise ValueError(f"dense-and-sparse selector={selector!r} is not one of {', '.join(self.SELECTORS)}")
        self.base = base
        self.keep_ratio = float(keep_ratio)
        self.selector = selector
        self.name = name or f"{base.name}_sparse{self.keep_ratio:g}" + ("_mag" if selector == "magnitude" else "")
        self.needs_calibration = base.needs_calibration
        self.sensitivity: dict[str, Tensor] | None = None

    def mask(self, weight: Tensor, name: str | None = None) -> Tensor:
        """Entries of ``weight`` kept in full precision."""
        by_score = self.selector == "sensitivity" and self.sensitivity is not None and name is not None
        score = self.sensitivity.get(name) if by_score else None
        if score is None:
            score = weight.abs()
        elif score.shape != weight.shape:
            raise ValueError(f"sensitivity of {name} has shape {tuple(score.shape)}, weight {tuple(weight.shape)}")
        return top_fraction_mask(score.to(weight.device), self.keep_ratio)

    def _base_sensitivity(self, masks: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]):
        return masked_base_sensitivity(self.base, masks, shapes, self.sensitivity)

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        key = name if name is not None else "_"
        mask = self.mask(weight, name)
        with self._base_sensitivity({key: mask}, {key: weight.shape}):
            q = self.base.quantize_weight(weight.masked_fill(mask, 0), name=key)
        return torch.where(mask, weight, q.to(weight.dtype))

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """The base quantizer's fields for the dense part, plus ``sparse_index`` (flat positions of the
        kept entries, int64) and ``sparse_value`` (their exact values, float32)."""
        key = name if name is not None else "_"
        mask = self.mask(weight, name)
        with self._base_sensitivity({key: mask}, {key: weight.shape}):
            dense = self.base.encode_weight(weight.masked_fill(mask, 0), name=key)
        return with_sparse(dense, mask, weight[mask])

    @torch.no_grad()
    def encode_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        masks = {name: self.mask(lin.weight, name) for name, lin in linears.items()}
        dense = encode_dense(self.base, model, linears, masks, calibration, self.sensitivity)
        return {name: with_sparse(dense[name], masks[name].cpu(), lin.weight[masks[name]].cpu()) for name, lin in linears.items()}

    def __repr__(self) -> str:
        return f"DenseAndSparse(base={self.base!r}, keep_ratio={self.keep_ratio}, name={self.name!r}, selector={self.selector!r})"


@contextmanager
def masked_base_sensitivity(
    base: WeightQuantizer,
    masks: Mapping[str, Tensor],
    shapes: Mapping[str, torch.Size],
    fallback: Mapping[str, Tensor] | None = None,
) -> Iterator[None]:
    """Temporarily give a sensitivity-aware ``base`` (k-means) zero weight at the kept positions ``masks``.

    Its own scores are used, else ``fallback``, else ones; bases without a ``sensitivity`` attribute are left alone.
    """
    if not hasattr(base, "sensitivity"):
        yield
        return
    original = base.sensitivity
    scores = original if original is not None else fallback
    masked = {}
    for name, mask in masks.items():
        s = None if scores is None else scores.get(name)
        s = torch.ones(shapes[name], device=mask.device) if s is None else s.to(mask.device).float()
        masked[name] = s.masked_fill(mask, 0.0)
    base.sensitivity = masked
    try:
        yield
    finally:
        base.sensitivity = original


@torch.no_grad()
def encode_dense(
    base: WeightQuantizer,
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    masks: Mapping[str, Tensor],
    calibration: Tensor | None = None,
    sensitivity: Mapping[str, Tensor] | None = None,
) -> dict[str, dict[str, Tensor]]:
    """The base's fields (on the CPU) for the dense part of each linear: its weight without the entries of
    ``masks`` (bool, shaped like the weight), which the sparse part holds. The model is left unchanged.

    A base that calibrates on the model (GPTQ, which has a ``kept`` attribute) is told the masks: it keeps
    those entries at their exact values, so its calibration passes see the dense + sparse model and its
    error compensation knows they are exact. Any other base quantizes the weight with those entries set
    to 0, out of its ranges (and, with a ``sensitivity`` attribute, out of its k-means clustering).
    """
    with weights_restored(linears):
        if hasattr(base, "kept"):
            original, base.kept = base.kept, dict(masks)
            try:
                return base.encode_model(model, linears, calibration)
            finally:
                base.kept = original
        for name, lin in linears.items():
            lin.weight.masked_fill_(masks[name], 0)
        with masked_base_sensitivity(base, masks, {name: lin.weight.shape for name, lin in linears.items()}, sensitivity):
            return base.encode_model(model, linears, calibration)


def decode_dense_and_sparse(base: WeightQuantizer, payload: Mapping[str, Tensor]) -> Tensor:
    """Float32 weight: ``base`` decodes the dense fields, then the sparse values overwrite their positions."""
    dense = base.decode_weight({k: v for k, v in payload.items() if k not in SPARSE_FIELDS})
    index, value = payload["sparse_index"].long(), payload["sparse_value"].float()
    return dense.flatten().index_put((index,), value).reshape(dense.shape)


def with_sparse(dense: dict[str, Tensor], mask: Tensor, kept: Tensor) -> dict[str, Tensor]:
    """Add the kept entries (``mask`` True, values ``kept`` in row-major order) to a base quantizer's fields."""
    clash = set(dense) & set(SPARSE_FIELDS)
    if clash:
        raise ValueError(f"the base quantizer already stores fields {sorted(clash)}; cannot wrap it in DenseAndSparse")
    index = mask.flatten().nonzero().squeeze(1)  # row-major, the order of weight[mask]
    return {**dense, "sparse_index": index, "sparse_value": kept.float()}

