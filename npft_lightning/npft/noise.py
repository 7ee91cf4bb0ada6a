"""Noise on the outlier weights: distributions, the scale schedule, and apply/restore in place.

A distribution draws one value δ per outlier, given the weight and the outlier mask (sorted
flat indices, or ``None`` for every entry of the matrix: ``outliers=all``, drawn with dense
operations). ``QuantErrorNoise`` is not random: δ is the exact quantization error of the merged
weight (W + ΔW_lora), so the forward pass sees the selected weights quantized (low-rank QAT when
every weight is selected, Quant-Noise with ``probability`` < 1). The random numbers are drawn on the CPU from a generator seeded by
(seed, epoch, step), so every DDP rank and a resumed run perturb the same weights by the same
amounts; only small per-row statistics travel from the weight's device to the CPU.

``apply_noise`` writes W[M] += δ in place and returns the original values, ``restore_noise``
writes them back bit for bit: the noise is a constant, non-differentiable offset (as in the
reference code, which writes it into ``.data``).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.restore import put_back, saved_values
from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.rtn import rtn_params, rtn_step

RAMPS = ("constant", "linear", "cosine")


def noise_generator(seed: int, epoch: int = -1, step: int = -1, stream: str = "npft-noise") -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, step); -1 marks a field that is not used.

    The triple is hashed (SHA-256, first 8 bytes), so nearby triples give unrelated streams and
    the seed is the same on every process, platform and Python run (no ``hash()`` salting).
    ``stream`` names what the numbers are for (another name, unrelated numbers for the same triple).
    """
    digest = hashlib.sha256(f"{stream}:{int(seed)}:{int(epoch)}:{int(step)}".encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _rows_of(weight: Tensor, indices: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """For flat ``indices`` of a [out, in] weight: the distinct rows, each index's row slot, its column (CPU)."""
    cols = weight.shape[-1]
    idx = torch.arange(weight.numel()) if indices is None else indices.detach().to("cpu", torch.long)
    rows, inverse = torch.unique(idx // cols, sorted=True, return_inverse=True)
    return rows, inverse, idx % cols


def _count(weight: Tensor, indices: Tensor | None) -> int:
    return weight.numel() if indices is None else indices.numel()


def _at(values: Tensor, indices: Tensor | None) -> Tensor:
    """``values`` flattened, at the flat ``indices`` (all of them for ``None``)."""
    flat = values.reshape(-1)
    return flat if indices is None else flat[indices.to(flat.device)]


class NoiseDistribution:
    """Base class: ``sample`` returns float32 δ for the flat ``indices`` of ``weight`` (all entries for ``None``).

    ``needs_merged``: ``sample`` is given the merged weight W + ΔW_lora instead of the base W.
    ``name`` is the canonical name of the weight's linear, for target quantizers that choose per
    tensor (a llama.cpp file type, an importance matrix); :meth:`bind` shows them the whole model first.
    """

    enabled: bool = True
    needs_merged: bool = False

    def __init__(self, scale: float = 1.0):
        self.scale = scale

    @property
    def scale(self) -> float:
        """Multiplier of the noise amplitude; a schedule may change it during training."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"noise scale={value} must be a finite number >= 0 (0 turns the noise off)")
        self._scale = value

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        raise NotImplementedError

    def bind(self, linears: Mapping[str, nn.Linear]) -> None:
        """Called with all the linears before a draw: a target quantizer that plans per tensor plans here."""
        quantizer = getattr(self, "quantizer", None)
        bind = getattr(quantizer, "bind", None)
        if callable(bind):
            bind(linears)

    def __repr__(self) -> str:
        fields = {k.lstrip("_"): v for k, v in vars(self).items()}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in fields.items())})"


class NPFTPaperNoise(NoiseDistribution):
    """The NPFT reference code's noise: uniform over the row's outlier range, centred in the row.

    For each output row with outlier columns S: u_j ~ U[min W[row, S], max W[row, S]] i.i.d.,
    δ = scale · (u − mean_S u). Each row's outlier sum is preserved and a row with a single
    outlier gets δ = 0 (min = max).

    ``per_channel=False`` (the per-weight ablation; the paper's exact reading is unknown): the
    range is that of *all* outliers of the matrix instead of the row's. ``center`` says how
    u is centred: ``"row"`` (default, the reference: subtract the row mean, so single-outlier
    rows still get 0) or ``"midpoint"`` (subtract the range midpoint: i.i.d. zero-mean noise
    U[−r/2, r/2] on every outlier, single ones included, row sums preserved only on average).
    """

    CENTERS = ("row", "midpoint")

    def __init__(self, scale: float = 1.0, per_channel: bool = True, center: str = "row"):
        super().__init__(scale)
        if center not in self.CENTERS:
            raise ValueError(f"npft_paper noise center={center!r} is not one of {', '.join(self.CENTERS)}")
        self.per_channel = bool(per_channel)
        self.center = center

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        k = _count(weight, indices)
        if k == 0:
            return torch.zeros(0)
        rows, inverse, _ = _rows_of(weight, indices)
        values = _at(weight.detach(), indices).double().cpu()
        if self.per_channel:
            lo = torch.full((rows.numel(),), math.inf, dtype=torch.float64).scatter_reduce(0, inverse, values, "amin")
            hi = torch.full((rows.numel(),), -math.inf, dtype=torch.float64).scatter_reduce(0, inverse, values, "amax")
            lo, hi = lo[inverse], hi[inverse]
        else:
            lo, hi = values.min().expand(k), values.max().expand(k)
        u = lo + (hi - lo) * torch.rand(k, generator=generator, dtype=torch.float64)
        if self.center == "midpoint":
            centre = (lo + hi) / 2
        else:
            counts = torch.bincount(inverse, minlength=rows.numel()).double()
            centre = (torch.zeros(rows.numel(), dtype=torch.float64).index_add_(0, inverse, u) / counts)[inverse]
        return ((u - centre) * self.scale).float()  # float64 above keeps row sums at ~1e-16 before the cast


class UniformStepNoise(NoiseDistribution):
    """δ ~ U[−scale·Δ/2, scale·Δ/2] with Δ the target RTN quantizer's step at that weight.

    Δ is the per-row (or per-group of ``group_size`` columns) step of the asymmetric/symmetric
    RTN grid (``quant.rtn``), computed only on the rows that hold outliers. ``per_channel=False``
    uses one per-tensor grid for the whole matrix (``group_size`` is then ignored). Zero-mean,
    variance scale²·Δ²/12: the rounding error of a uniform quantizer with that step.
    ``quantizer``: any quantizer with a ``step(weight)`` method (RTN, the ggml block formats)
    gives Δ instead of ``bits`` / ``group_size`` / ``sym``.
    """

    def __init__(
        self,
        scale: float = 1.0,
        bits: int = 4,
        group_size: int | None = None,
        sym: bool = False,
        per_channel: bool = True,
        quantizer: WeightQuantizer | None = None,
    ):
        super().__init__(scale)
        if quantizer is not None and not callable(getattr(quantizer, "step", None)):
            raise ValueError(f"uniform_step noise needs a quantizer with a step size; {quantizer.name} has none: "
                             f"use noise=quant_error for it, or an RTN / ggml quantizer")
        self.quantizer = quantizer
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"uniform_step noise bits={bits} is outside 2..8; use the target quantizer's bit width")
        if group_size is not None and int(group_size) <= 0:
            raise ValueError(f"uniform_step noise group_size={group_size} must be a positive divisor of the input features, or null")
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.sym = bool(sym)
        self.per_channel = bool(per_channel)

    def step(self, weight: Tensor, indices: Tensor | None, name: str | None = None) -> Tensor:
        """Quantization step Δ (float32, CPU) at each flat index (every entry for ``None``)."""
        if self.quantizer is not None:
            return _at(self.quantizer.step(weight.detach().float(), name=name), indices).float().cpu()
        if not self.per_channel:
            scale, _ = rtn_params(weight.detach().reshape(1, -1), self.bits, None, self.sym)
            return scale.reshape(1).cpu().expand(_count(weight, indices)).clone()
        if indices is None:
            return rtn_step(weight.detach(), self.bits, self.group_size, self.sym).reshape(-1).cpu()
        rows, inverse, cols = _rows_of(weight, indices)
        sub = weight.detach()[rows.to(weight.device)]
        scale, _ = rtn_params(sub, self.bits, self.group_size, self.sym)  # [n_rows, n_groups]
        group = cols // (weight.shape[-1] if self.group_size is None else self.group_size)
        return scale.cpu()[inverse, group]

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        k = _count(weight, indices)
        if k == 0:
            return torch.zeros(0)
        unit = torch.rand(k, generator=generator) - 0.5  # U[-1/2, 1/2]
        return unit * self.step(weight, indices, name) * self.scale


class GaussianNoise(NoiseDistribution):
    """δ ~ N(0, (scale·σ)²), σ the std of the outlier's row (``per_channel``) or of the whole matrix."""

    def __init__(self, scale: float = 1.0, per_channel: bool = True):
        super().__init__(scale)
        self.per_channel = bool(per_channel)

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        k = _count(weight, indices)
        if k == 0:
            return torch.zeros(0)
        w = weight.detach()
        if self.per_channel and indices is None:
            sigma = w.float().std(dim=1, keepdim=True).expand_as(w).reshape(-1).cpu()
        elif self.per_channel:
            rows, inverse, _ = _rows_of(weight, indices)
            sigma = w[rows.to(w.device)].float().std(dim=1).cpu()[inverse]
        else:
            sigma = w.float().std().cpu().expand(k)
        return torch.randn(k, generator=generator) * sigma * self.scale


def quantization_error(quantizer: WeightQuantizer, weight: Tensor, indices: Tensor | None = None, name: str | None = None) -> Tensor:
    """Q(w) − w in float32, flat at ``indices`` (the whole matrix for ``None``): the quantizer's own fused
    form when it has one (RTN: only the selected entries are rounded); for a quantizer whose rows are
    quantized independently (``rows_independent``: the ggml types) only the rows holding ``indices``;
    else quantize all and subtract. ``name``: the weight's linear, for quantizers that choose per tensor."""
    fused = getattr(quantizer, "quantization_error", None)
    if callable(fused):
        return fused(weight, indices)
    w = weight.float()
    if indices is not None and getattr(quantizer, "rows_independent", False):
        rows, inverse, cols = _rows_of(w, indices)
        sub = w[rows.to(w.device)]
        error = quantizer.quantize_weight(sub, name=name).float() - sub
        return error[inverse.to(w.device), cols.to(w.device)]
    return _at(quantizer.quantize_weight(w, name=name).float() - w, indices)


class QuantErrorNoise(NoiseDistribution):
    """δ = scale · (Q(W') − W') at the selected weights, W' = W + ΔW_lora the merged weight.

    Not random: with ``scale=1`` the forward pass sees the selected weights exactly as the
    quantized model will hold them (the base weight becomes Q(W') − ΔW_lora there, and the LoRA
    path adds ΔW_lora back), while the gradient reaches the adapters as if nothing was quantized:
    a straight-through estimate. Every weight selected (``outliers=all``) is low-rank QAT
    (LR-QAT, L4Q). ``probability`` p < 1: each selected weight takes its error with probability p
    in each draw (Quant-Noise, Fan et al. 2020), the bridge between random and exact noise.
    ``quantizer`` is any weight-local quantizer (RTN per channel / group, NF4, ggml blocks); the
    grid is that of the whole merged matrix, recomputed every draw.

    ``quantizers``: several target grids instead of one, a list of ``{quantizer, weight}``; each draw
    quantizes with the one :meth:`use_grid` chose (the training callback draws it per step, with
    probability proportional to its weight). ``quantizer`` is then the grid in use.
    """

    needs_merged = True

    def __init__(self, quantizer: WeightQuantizer | None = None, scale: float = 1.0, probability: float = 1.0,
                 quantizers: Sequence[Mapping[str, Any]] | None = None):
        super().__init__(scale)
        if (quantizer is None) == (quantizers is None):
            raise ValueError("quant_error noise needs one target: noise.distribution.quantizer, or a list of "
                             "noise.distribution.quantizers with quantizer=null")
        grids = [{"quantizer": quantizer, "weight": 1.0}] if quantizers is None else list(quantizers)
        if not grids:
            raise ValueError("noise.distribution.quantizers=[] lists no grid; give at least one {quantizer: ..., weight: ...}")
        for i, grid in enumerate(grids):
            if not isinstance(grid, Mapping) or not isinstance(grid.get("quantizer"), WeightQuantizer):
                raise ValueError(f"noise.distribution.quantizers[{i}]={grid!r} is not a {{quantizer: <quantizer config>, "
                                 f"weight: <number>}}, e.g. {{quantizer: ${{quant.rtn4}}, weight: 1}}")
            weight = grid.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"noise.distribution.quantizers[{i}].weight={weight} must be a finite number > 0 "
                                 f"(the grid's share of the quantized steps is its weight over the sum)")
            if getattr(grid["quantizer"], "needs_calibration", False):
                local = getattr(grid["quantizer"], "grid_name", "rtn4")
                raise ValueError(f"quant_error noise needs a weight-local quantizer; {grid['quantizer'].name} needs "
                                 f"calibration data (GPTQ): target its grid instead, "
                                 f"noise.distribution.quantizer='${{quant.{local}}}' with {local} in quant (e.g. quant=[{local}])")
        probability = float(probability)
        if not (math.isfinite(probability) and 0.0 < probability <= 1.0):
            raise ValueError(f"noise.probability={probability} must be in (0, 1]: the chance that a selected weight "
                             f"takes its quantization error in a draw (1 = always)")
        self.grids: list[WeightQuantizer] = [grid["quantizer"] for grid in grids]
        self.grid_weights: list[float] = [float(grid.get("weight", 1.0)) for grid in grids]
        self.grid = 0
        self.quantizer = self.grids[0]
        self.probability = probability

    def use_grid(self, index: int) -> None:
        """Quantize the next draws with grid ``index`` of :attr:`grids`."""
        self.grid = int(index)
        self.quantizer = self.grids[self.grid]

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        k = _count(weight, indices)
        if k == 0:
            return torch.zeros(0)
        error = quantization_error(self.quantizer, weight.detach(), indices, name).reshape(-1)
        if self.probability < 1.0:
            keep = torch.rand(k, generator=generator) < self.probability
            error = error * keep.to(error.device)
        return error * self.scale if self.scale != 1.0 else error


class NoNoise(NoiseDistribution):
    """The control: no perturbation. ``enabled`` is False so callers can skip the work entirely."""

    enabled = False

    def __init__(self, scale: float = 0.0):
        super().__init__(scale)

    def sample(self, weight: Tensor, indices: Tensor | None, generator: torch.Generator, name: str | None = None) -> Tensor:
        return torch.zeros(_count(weight, indices))


def scale_schedule(
    step: int,
    total_steps: int,
    base_scale: float,
    warmup_steps: int = 0,
    ramp: str = "constant",
) -> float:
    """Noise scale at ``step``: 0 before ``warmup_steps``, then ``ramp`` from 0 up to ``base_scale``.

    ``constant`` jumps to ``base_scale`` at the end of warm-up; ``linear`` and ``cosine`` go from
    0 at ``warmup_steps`` to ``base_scale`` at ``total_steps`` (and stay there after).
    """
    if ramp not in RAMPS:
        raise ValueError(f"noise ramp={ramp!r} is not one of {', '.join(RAMPS)}")
    if step < warmup_steps:
        return 0.0
    if ramp == "constant" or total_steps <= warmup_steps:
        return float(base_scale)
    frac = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    if ramp == "linear":
        return float(base_scale) * frac
    return float(base_scale) * (1.0 - math.cos(math.pi * frac)) / 2.0


@torch.no_grad()
def apply_noise(
    linears: Mapping[str, nn.Linear],
    masks: Mapping[str, mask_ops.Mask],
    distribution: NoiseDistribution,
    generator: torch.Generator,
    deltas: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """W[M] += δ in place for every masked linear; returns the original W[M] for ``restore_noise``.

    Names are visited in sorted order so the generator stream is the same whatever the dict
    order. δ is added in float32 (float64 for float64 weights) and rounded once to the weight's
    dtype. A mask of every entry (``AllEntries``) is applied densely and saves the whole matrix.
    ``deltas`` (the merged LoRA updates) are added to the weight the distribution sees when it
    ``needs_merged``. A disabled distribution (``NoNoise``) touches nothing and returns ``{}``.
    """
    if not distribution.enabled:
        return {}
    distribution.bind(linears)
    saved: dict[str, Tensor] = {}
    for name in sorted(masks):
        weight = linears[name].weight
        flat = weight.data.view(-1)
        idx = mask_ops.index(masks[name], weight.device)
        original = saved[name] = saved_values(flat, idx)
        if idx is not None and idx.numel() == 0:
            continue
        seen = weight
        if getattr(distribution, "needs_merged", False) and deltas is not None and name in deltas:
            seen = weight.detach().float() + deltas[name].to(weight.device, torch.float32)
        delta = distribution.sample(seen, idx, generator, name=name).to(weight.device)
        work = torch.promote_types(weight.dtype, torch.float32)  # bf16/fp16 weights: add in float32
        if idx is None and work == weight.dtype:
            flat.add_(delta.to(work))  # dense fp32: in place, the same sum as original + delta
            continue
        perturbed = (original.to(work) + delta.to(work)).to(weight.dtype)
        if idx is None:
            flat.copy_(perturbed)
        else:
            flat[idx] = perturbed
    return saved


@torch.no_grad()
def restore_noise(linears: Mapping[str, nn.Linear], masks: Mapping[str, mask_ops.Mask], saved: Mapping[str, Tensor]) -> None:
    """Write the values saved by ``apply_noise`` back: a bit-exact restore."""
    for name, original in saved.items():
        weight = linears[name].weight
        put_back(weight.data.view(-1), original, mask_ops.index(masks[name], weight.device))
