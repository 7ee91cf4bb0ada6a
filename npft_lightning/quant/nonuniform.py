"""Non-uniform weight quantizers: Fisher-weighted k-means (SqueezeLLM), cube-root companding, NormalFloat.

* k-means: per output row, a lookup table of 2^b centroids fitted by weighted 1-D Lloyd
  iterations (weights = Fisher sensitivity, uniform when absent), all rows at once.
* cube-root ("lens of perturbation"): RTN on ``sign(w)|w|^(1/3)``, then cubed back, so the grid
  is dense near 0 and coarse for large |w|.
* NormalFloat (QLoRA): a fixed table of normal quantiles scaled by the absmax of each block.

All math is float32.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from npft_lightning.quant.base import WeightQuantizer, is_int
from npft_lightning.quant.rtn import _grouped, rtn_quantize
from npft_lightning.quant.uniform import (
    UniformGridQuantizer,
    decode_rtn_fields,
    rtn_fields,
)

# ---------------------------------------------------------------------------------------------
# k-means (SqueezeLLM-style)
# ---------------------------------------------------------------------------------------------


def _row_weights(weight: Tensor, sensitivity: Tensor | None) -> Tensor:
    """Non-negative per-element weights, scaled to max 1 per row; uniform for rows without any weight."""
    if sensitivity is None:
        return torch.ones_like(weight)
    if sensitivity.shape != weight.shape:
        raise ValueError(f"sensitivity shape {tuple(sensitivity.shape)} != weight shape {tuple(weight.shape)}")
    s = sensitivity.to(device=weight.device, dtype=torch.float32).clamp(min=0)
    peak = s.amax(dim=1, keepdim=True)
    # Scaling keeps tiny Fisher values (1e-12) well inside float32; an all-zero row falls back to uniform.
    return torch.where(peak > 0, s / peak.clamp(min=torch.finfo(torch.float32).tiny), torch.ones_like(s))


def _boundaries(sorted_w: Tensor, lut: Tensor) -> Tensor:
    """Cluster starts [rows, k+1] in each ascending row for an ascending ``lut``: cluster j holds the
    sorted positions [b_j, b_j+1), i.e. the values w with mid_(j-1) < w <= mid_j (nearest centroid,
    a tie going to the lower one)."""
    rows, n = sorted_w.shape
    mids = ((lut[:, 1:] + lut[:, :-1]) / 2).contiguous()
    inner = torch.searchsorted(sorted_w, mids, right=True)
    zeros = torch.zeros(rows, 1, dtype=inner.dtype, device=inner.device)
    return torch.cat([zeros, inner, torch.full_like(zeros, n)], dim=1)


def _sorted_codes(bounds: Tensor, n: int) -> Tensor:
    """Cluster index of every sorted position, from the cluster starts."""
    marks = torch.zeros(bounds.shape[0], n + 1, dtype=torch.int64, device=bounds.device)
    marks.scatter_add_(1, bounds[:, 1:-1], torch.ones_like(bounds[:, 1:-1]))
    return marks.cumsum(dim=1)[:, :n]


def _kmeans_rows(w: Tensor, s: Tensor, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Weighted Lloyd iterations on all rows at once.

    In 1-D every cluster is a contiguous run of the sorted row, so after one sort the assignment
    is k-1 binary searches per row and the cluster sums are differences of (float64) prefix sums:
    an iteration costs O(rows·k·log n), not O(rows·n).
    """
    rows, n = w.shape
    sorted_w, order = w.sort(dim=1)
    sorted_s = s.gather(1, order)
    zero_col = torch.zeros(rows, 1, dtype=torch.float64, device=w.device)
    prefix_mass = torch.cat([zero_col, sorted_s.double().cumsum(dim=1)], dim=1)
    prefix_total = torch.cat([zero_col, (sorted_s.double() * sorted_w.double()).cumsum(dim=1)], dim=1)
    # Deterministic init: the weighted (j + 1/2)/k quantiles of each row.
    targets = (torch.arange(k, device=w.device, dtype=torch.float64) + 0.5) / k * prefix_mass[:, -1:]
    lut = sorted_w.gather(1, torch.searchsorted(prefix_mass[:, 1:].contiguous(), targets).clamp(max=n - 1))
    all_rows = torch.arange(rows, device=w.device)

    for _ in range(iters):
        lut = lut.sort(dim=1).values
        bounds = _boundaries(sorted_w, lut)
        mass = prefix_mass.gather(1, bounds[:, 1:]) - prefix_mass.gather(1, bounds[:, :-1])
        total = prefix_total.gather(1, bounds[:, 1:]) - prefix_total.gather(1, bounds[:, :-1])
        new = torch.where(mass > 0, (total / mass.clamp(min=1e-300)).float(), lut)
        empty = mass <= 0  # includes duplicates of another centroid (ties go to the first one)
        r = all_rows[empty.any(dim=1)]
        if r.numel():
            # Move one empty centroid per such row onto the worst-represented point of that row.
            codes = _sorted_codes(bounds[r], n)
            # (a tiny floor lets zero-weight points attract an otherwise idle centroid)
            err, worst = ((sorted_s[r] + 1e-6) * (sorted_w[r] - new[r].gather(1, codes)) ** 2).max(dim=1)
            r, worst = r[err > 0], worst[err > 0]
            new[r, empty[r].int().argmax(dim=1)] = sorted_w[r, worst]
        if torch.equal(new, lut):
            break
        lut = new

    lut = lut.sort(dim=1).values
    bounds = _boundaries(sorted_w, lut)
    # A cluster holding a single distinct value gets exactly that value (float means can be off by an ulp).
    nonempty = bounds[:, 1:] > bounds[:, :-1]
    lo = sorted_w.gather(1, bounds[:, :-1].clamp(max=n - 1))
    hi = sorted_w.gather(1, (bounds[:, 1:] - 1).clamp(min=0))
    lut = torch.where(nonempty & (lo == hi), lo, lut)
    codes = torch.empty_like(order).scatter_(1, order, _sorted_codes(bounds, n))
    return codes, lut


def kmeans_encode(
    weight: Tensor, bits: int, sensitivity: Tensor | None = None, iters: int = 50, chunk_rows: int = 1024
) -> tuple[Tensor, Tensor]:
    """Per-row weighted k-means: codes [rows, cols] (uint8) and an ascending lookup table [rows, 2^bits] (float32)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    w = weight.detach().float()
    s = _row_weights(w, sensitivity)
    codes, luts = [], []
    for start in range(0, w.shape[0], chunk_rows):  # bounds the [rows, cols] temporaries
        c, lut = _kmeans_rows(w[start : start + chunk_rows], s[start : start + chunk_rows], 2**bits, iters)
        codes.append(c.to(torch.uint8))
        luts.append(lut)
    return torch.cat(codes), torch.cat(luts)


def kmeans_decode(codes: Tensor, lut: Tensor) -> Tensor:
    """Float32 weight from per-row codes and lookup tables."""
    return lut.gather(1, codes.long())


def kmeans_quantize(weight: Tensor, bits: int, sensitivity: Tensor | None = None, iters: int = 50) -> Tensor:
    """Fake-quantized copy of ``weight`` (same dtype): each value replaced by its row centroid."""
    codes, lut = kmeans_encode(weight, bits, sensitivity, iters)
    return kmeans_decode(codes, lut).to(weight.dtype)


class KMeans(WeightQuantizer):
    """SqueezeLLM-style non-uniform quantizer: per-row Fisher-weighted k-means lookup tables.

    Set ``sensitivity`` (canonical name -> Fisher scores, same shape as the weight) before
    quantizing to weight the clustering; matrices without an entry use uniform weights.
    """

    def __init__(self, bits: int = 3, iters: int = 50, name: str | None = None):
        if not (is_int(bits) and 2 <= bits <= 8):
            raise ValueError(f"quant bits={bits} is outside 2..8; use a value from 2 to 8")
        if not (is_int(iters) and iters >= 0):
            raise ValueError(f"quant iters={iters} must be an integer >= 0 (Lloyd iterations per row)")
        self.bits = int(bits)
        self.iters = int(iters)
        self.name = name or f"kmeans{self.bits}"
        self.sensitivity: dict[str, Tensor] | None = None

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """``codes`` [rows, cols] uint8 and a per-row lookup table ``lut`` [rows, 2^bits] float32."""
        sensitivity = None if self.sensitivity is None or name is None else self.sensitivity.get(name)
        codes, lut = kmeans_encode(weight, self.bits, sensitivity, self.iters)
        return {"codes": codes, "lut": lut}

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return kmeans_decode(payload["codes"], payload["lut"])

    def __repr__(self) -> str:  # the sensitivity dict is too big to print
        return f"KMeans(bits={self.bits}, iters={self.iters}, name={self.name!r}, sensitivity={'set' if self.sensitivity else None})"


# ---------------------------------------------------------------------------------------------
# cube-root companding
# ---------------------------------------------------------------------------------------------


def cuberoot_quantize(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """RTN (GPTQ grid) on ``f(w) = sign(w)|w|^(1/3)``, then ``ŵ = Q(f(w))³``; same dtype as ``weight``."""
    w = weight.float()
    f = torch.sign(w) * w.abs().pow(1.0 / 3.0)
    fq = rtn_quantize(f, bits, group_size, sym)
    return (fq * fq * fq).to(weight.dtype)


def cuberoot_fields(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> dict[str, Tensor]:
    """RTN fields (``codes``, ``scale``, ``zero``) of the cube root ``sign(w)|w|^(1/3)``."""
    w = weight.float()
    return rtn_fields(torch.sign(w) * w.abs().pow(1.0 / 3.0), bits, group_size, sym)


def decode_cuberoot_fields(payload: Mapping[str, Tensor], group_size: int | None) -> Tensor:
    """Float32 ``Q(f(w))³`` (the same ops as :func:`cuberoot_quantize`)."""
    fq = decode_rtn_fields(payload, group_size)
    return fq * fq * fq


class CubeRoot(UniformGridQuantizer):
    """The "lens of perturbation" non-uniform quantizer: uniform on the cube root, cubed back."""

    family = "cuberoot"

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """RTN ``codes`` / ``scale`` / ``zero`` of the cube root of ``weight``."""
        return cuberoot_fields(weight, self.bits, self.group_size, self.sym)

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return decode_cuberoot_fields(payload, self.group_size)


# ---------------------------------------------------------------------------------------------
# NormalFloat (QLoRA)
# ---------------------------------------------------------------------------------------------

# The 16 NF4 levels published with QLoRA (Dettmers et al., 2023, appendix E).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def nf_levels(bits: int = 4) -> Tensor:
    """Ascending NormalFloat levels in [-1, 1] (float32): the published table for 4 bits.

    Other widths follow the QLoRA construction: 2^(b-1) positive and 2^(b-1)-1 negative normal
    quantiles between ``offset`` and 1/2, plus an exact 0, normalised to max |level| = 1, with
    ``offset = 1 - (1/(2(2^b-1)) + 1/(2·2^b))/2`` (0.9677 for 4 bits, which reproduces the table).
    """
    if bits == 4:
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8")
    n = 2**bits
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.abs().max()).float()


def nf_encode(weight: Tensor, bits: int = 4, block_size: int = 64) -> tuple[Tensor, Tensor]:
    """Level indices [rows, cols] (uint8) and the absmax of each block of ``block_size`` elements of a row
    [rows, cols / block_size] (float32)."""
    blocks = _grouped(weight.float(), block_size)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))  # an all-zero block stays zero
    levels = nf_levels(bits).to(weight.device)
    codes = torch.bucketize(blocks / absmax, (levels[1:] + levels[:-1]) / 2)
    return codes.reshape(weight.shape).to(torch.uint8), absmax[..., 0]


def nf_decode(codes: Tensor, absmax: Tensor, bits: int = 4) -> Tensor:
    """Float32 weight ``absmax · level[code]``, the block size being ``cols / absmax.shape[1]``."""
    blocks = _grouped(codes, codes.shape[1] // absmax.shape[1]).long()
    levels = nf_levels(bits).to(codes.device)
    return (levels[blocks] * absmax[..., None]).reshape(codes.shape)


def nf_quantize(weight: Tensor, bits: int = 4, block_size: int = 64) -> Tensor:
    """NormalFloat fake quantization: per contiguous block of ``block_size`` elements of each row,
    ``ŵ = absmax · level[nearest(w / absmax)]``; same dtype as ``weight``."""
    codes, absmax = nf_encode(weight, bits, block_size)
    return nf_decode(codes, absmax, bits).to(weight.dtype)


def nf4_quantize(weight: Tensor, block_size: int = 64) -> Tensor:
    """NF4 (QLoRA) fake quantization with block-wise absmax scaling."""
    return nf_quantize(weight, 4, block_size)


class NF(WeightQuantizer):
    """NormalFloat lookup-table quantizer with a float32 absmax per block of ``block_size`` elements of a row."""

    def __init__(self, bits: int = 4, block_size: int = 64, name: str | None = None):
        if not (is_int(bits) and 2 <= bits <= 8):
            raise ValueError(f"quant bits={bits} is outside 2..8; use a value from 2 to 8")
        if not (is_int(block_size) and block_size > 0):
            raise ValueError(f"quant block_size={block_size} must be a positive divisor of the input features")
        self.bits = int(bits)
        self.block_size = int(block_size)
        self.name = name or (f"nf{self.bits}" if self.block_size == 64 else f"nf{self.bits}_b{self.block_size}")

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """Level indices ``codes`` [rows, cols] uint8 and ``absmax`` [rows, cols / block_size] float32."""
        codes, absmax = nf_encode(weight, self.bits, self.block_size)
        return {"codes": codes, "absmax": absmax}

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return nf_decode(payload["codes"], payload["absmax"], self.bits)


class NF4(NF):
    """NF4 as in QLoRA (block 64 by default)."""

    def __init__(self, block_size: int = 64, name: str | None = None):
        super().__init__(4, block_size, name)
