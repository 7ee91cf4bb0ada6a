"""Artificial perturbations of weights and activations ("the lens of perturbation", Gong et al., AAAI 2024).

Quantization is one perturbation among many, ``x̂ = x + δ``; perturbing the weights (or the inputs
of the linears) on purpose with controlled kinds and sizes shows which perturbations a model
tolerates. A kind is

* a **distribution** of the unit noise u: ``uniform`` U[-1, 1], ``gaussian`` N(0, 1), ``rademacher`` ±1;
* a **reference** the noise is relative to, with ε = magnitude · u:
  ``element``: multiplicative, ``x' = x·(1 + ε)`` (the error grows with |x|);
  ``range``: additive, ``x' = x + ε·(max − min)`` of the element's row, or group of ``group_size``
  columns (for activations: of its token), the way a uniform quantizer's error scales: the b-bit
  RTN step is about range / (2^b − 1), so uniform noise of magnitude 1/(2(2^b − 1)) has the
  rounding error's size;
* **sign preservation**: ``sign_preserving=True`` sets to 0 any value whose sign the noise would
  flip (for ``element`` that is clamping 1 + ε at 0);
* a **mask** of the coordinates touched: ``all``, ``topk`` (the ``ratio`` % largest |x| of each
  weight matrix, or of each token for activations), or ``outliers`` (given flat indices, e.g. the
  NPFT Fisher outliers of :mod:`npft_lightning.npft.outliers`; weights only).

Everything else stays bit-exact. Unit noise is drawn only for the masked coordinates, in row-major
order, from a caller's seeded generator (weights: a CPU generator, so the draws do not depend on the
device). :func:`perturbed_weights` writes a perturbation into the linears in place and restores
the saved values bit for bit; :func:`perturbed_activations` perturbs each linear's input through
forward pre-hooks. Math in float32; results in the input's dtype.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.restore import values_restored
from npft_lightning.core.topk import row_top_fraction_mask, top_fraction_mask

DISTRIBUTIONS = ("uniform", "gaussian", "rademacher")
REFERENCES = ("element", "range")
MASKS = ("all", "topk", "outliers")
TARGETS = ("weight", "activation")


def unit_noise(n: int, distribution: str, generator: torch.Generator) -> Tensor:
    """``n`` float32 draws on the generator's device: U[-1, 1], N(0, 1) or ±1 with probability 1/2 each."""
    device = generator.device
    if distribution == "uniform":
        return torch.rand(n, generator=generator, device=device) * 2 - 1
    if distribution == "gaussian":
        return torch.randn(n, generator=generator, device=device)
    if distribution == "rademacher":
        return torch.randint(0, 2, (n,), generator=generator, device=device).float() * 2 - 1
    raise ValueError(f"perturbation distribution={distribution!r} is not one of {', '.join(DISTRIBUTIONS)}")


def group_range(x: Tensor, group_size: int | None = None) -> Tensor:
    """``max − min`` of each element's row (last dimension) or group of ``group_size`` consecutive
    columns of it, broadcast to the shape of ``x`` (float32)."""
    cols = x.shape[-1]
    g = cols if group_size is None else int(group_size)
    if g <= 0 or cols % g:
        raise ValueError(f"perturbation group_size={group_size} does not divide the {cols} features; pick a divisor of {cols} or null")
    groups = x.float().reshape(*x.shape[:-1], cols // g, g)
    spread = groups.amax(dim=-1, keepdim=True) - groups.amin(dim=-1, keepdim=True)
    return spread.expand_as(groups).reshape(x.shape)




def perturb_values(
    x: Tensor,
    magnitude: float,
    generator: torch.Generator,
    distribution: str = "uniform",
    reference: str = "element",
    mask: Tensor | None = None,
    group_size: int | None = None,
    sign_preserving: bool = False,
) -> Tensor:
    """A perturbed copy of ``x``: at ``mask`` (None = everywhere) ``x + ε·ref`` with ε = magnitude · unit noise.

    ``ref`` is ``x`` itself (``element``: ``x·(1+ε)``) or the range of the element's row / group
    (``range``). With ``sign_preserving`` a value whose sign would flip becomes 0. Coordinates
    outside the mask are returned bit-exactly.
    """
    if reference not in REFERENCES:
        raise ValueError(f"perturbation relative={reference!r} is not one of {', '.join(REFERENCES)}")
    xf = x.float()
    if mask is None:
        eps = unit_noise(x.numel(), distribution, generator).to(x.device).reshape(x.shape)
    else:
        eps = torch.zeros(x.shape, device=x.device)
        eps[mask] = unit_noise(int(mask.sum()), distribution, generator).to(x.device)
    eps = eps * float(magnitude)
    ref = xf if reference == "element" else group_range(xf, group_size)
    y = xf + eps * ref
    if sign_preserving:
        y = torch.where(y * xf < 0, torch.zeros_like(y), y)
    y = y.to(x.dtype)
    return y if mask is None else torch.where(mask, y, x)


class Perturbation:
    """One kind of perturbation and the magnitudes to sweep (``conf/perturb/*.yaml``).

    ``target``: ``weight`` (the decoder linears' weights) or ``activation`` (their inputs);
    ``distribution``, ``relative`` (the reference: ``element`` or ``range``), ``group_size``
    (range per row when null), ``sign_preserving`` and ``mask`` (``all``, ``topk`` with ``ratio`` %,
    ``outliers``: the NPFT outlier masks the caller passes) as in the module docstring.
    """

    def __init__(
        self,
        name: str,
        target: str = "weight",
        distribution: str = "uniform",
        relative: str = "element",
        sign_preserving: bool = False,
        mask: str = "all",
        ratio: float | None = None,
        group_size: int | None = None,
        magnitudes: Sequence[float] = (0.01, 0.02, 0.05, 0.1, 0.2),
    ):
        for key, value, allowed in (("target", target, TARGETS), ("distribution", distribution, DISTRIBUTIONS),
                                    ("relative", relative, REFERENCES), ("mask", mask, MASKS)):
            if value not in allowed:
                raise ValueError(f"perturb.{name}.{key}={value!r} is not one of {', '.join(allowed)}")
        if mask == "outliers" and target == "activation":
            raise ValueError(f"perturb.{name}.mask=outliers marks weights; for activations use mask=all or mask=topk")
        if mask == "topk" and (ratio is None or not 0 < float(ratio) <= 100):
            raise ValueError(f"perturb.{name}.ratio={ratio} must be a percentage in (0, 100] with mask=topk")
        if group_size is not None and int(group_size) <= 0:
            raise ValueError(f"perturb.{name}.group_size={group_size} must be a positive divisor of the features, or null")
        values = [float(m) for m in magnitudes]
        if not values or any(not (math.isfinite(m) and m >= 0) for m in values):
            raise ValueError(f"perturb.{name}.magnitudes={list(magnitudes)} must be a non-empty list of finite numbers >= 0")
        self.name = name
        self.target = target
        self.distribution = distribution
        self.relative = relative
        self.sign_preserving = bool(sign_preserving)
        self.mask = mask
        self.ratio = None if ratio is None else float(ratio)
        self.group_size = None if group_size is None else int(group_size)
        self.magnitudes = values

    def describe(self) -> str:
        """A short human label: ``weight · uniform · w(1+ε) · all · sign-free``."""
        ref = "x(1+ε)" if self.relative == "element" else "x+ε·range" + (f"/g{self.group_size}" if self.group_size else "")
        mask = {"all": "all", "topk": f"top {self.ratio or 0:g} % |x|", "outliers": "NPFT outliers"}[self.mask]
        return f"{self.target} · {self.distribution} · {ref} · {mask} · {'sign kept' if self.sign_preserving else 'sign free'}"

    def apply(self, x: Tensor, magnitude: float, generator: torch.Generator, mask: Tensor | None = None) -> Tensor:
        """Perturbed copy of ``x``; ``mask`` (bool) overrides the kind's own (``topk`` per matrix / token)."""
        if mask is None and self.mask == "topk":
            mask = top_fraction_mask(x.abs(), self.ratio) if self.target == "weight" else row_top_fraction_mask(x, self.ratio)
        return perturb_values(x, magnitude, generator, self.distribution, self.relative, mask, self.group_size, self.sign_preserving)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


@contextmanager
def perturbed_weights(
    linears: Mapping[str, nn.Linear],
    perturbation: Perturbation,
    magnitude: float,
    generator: torch.Generator,
    outliers: Mapping[str, Tensor] | None = None,
) -> Iterator[int]:
    """Within the block the weights of ``linears`` are perturbed; on exit they are restored bit for bit.

    Matrices are visited in sorted name order (one generator stream whatever the dict order); the
    unit noise is drawn on the generator's device (a CPU generator: the same draws on any device).
    With ``mask=outliers``, ``outliers`` maps names to flat indices; matrices without an entry are
    left alone. Yields the number of coordinates in the mask.
    """
    if perturbation.target != "weight":
        raise ValueError(f"perturbation {perturbation.name} targets {perturbation.target}s, not weights")
    if perturbation.mask == "outliers" and outliers is None:
        raise ValueError(f"perturbation {perturbation.name} has mask=outliers but no outlier masks were given")
    masks: dict[str, Tensor | None] = {}  # boolean, None for every entry
    with torch.no_grad():
        for name in sorted(linears):
            weight = linears[name].weight
            if perturbation.mask == "outliers":
                if name in outliers:
                    masks[name] = mask_ops.boolean(outliers[name], weight.shape, weight.device)
            elif perturbation.mask == "topk":
                masks[name] = top_fraction_mask(weight.abs(), perturbation.ratio)
            else:
                masks[name] = None
    weights = {name: linears[name].weight for name in masks}
    # Only the masked values are kept for the restore (all of them for mask=all).
    with values_restored(weights, masks):
        with torch.no_grad():
            for name, mask in masks.items():
                weights[name].copy_(perturbation.apply(weights[name].detach(), magnitude, generator, mask))
        yield sum(weights[name].numel() if mask is None else int(mask.sum()) for name, mask in masks.items())


@contextmanager
def perturbed_activations(
    linears: Mapping[str, nn.Linear], perturbation: Perturbation, magnitude: float, generator: torch.Generator
) -> Iterator[None]:
    """Within the block the input of every linear of ``linears`` is perturbed at each forward call
    (fresh noise per call, from ``generator``, which must live on the activations' device)."""
    if perturbation.target != "activation":
        raise ValueError(f"perturbation {perturbation.name} targets {perturbation.target}s, not activations")

    def perturb_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (perturbation.apply(args[0], magnitude, generator), *args[1:])

    handles = [linears[name].register_forward_pre_hook(perturb_input) for name in sorted(linears)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
