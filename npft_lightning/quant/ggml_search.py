"""ggml's per-block scale searches (``make_qx_quants``, ``make_qkx2_quants`` / ``make_qkx3_quants``,
``make_qp_quants``, ``make_q3_quants`` and the IQ4 grid search of ggml-quants.c), vectorized over blocks.

Every function takes the blocks transposed, ``x`` [n, B] (element ``i`` of block ``b`` at ``x[i, b]``),
so that C's element loop becomes a loop over n contiguous rows of B values, and returns what the C
function returns for each of the B blocks. The arithmetic is C's, operation for operation in float32:

* sums are accumulated in C's order, one element after the other (``_running_sum``), never by a
  reduction tree: their last bits decide which candidate scale wins;
* products keep C's association (``w*x*l`` is ``(w*x)*l``) and integer codes become floats where
  C converts them; ``nearest_int`` is C's bit trick (``_nearest_int``), integer narrowing to
  ``uint8`` / ``int8`` wraps as in C;
* division and square roots are correctly rounded (``div``, ``sqrtf``), as C's ``/`` and ``sqrtf``;
* no fused multiply-add: the libggml-base that llama.cpp's quantizer runs (``ggml_quantize_chunk``)
  is built without ``-mfma`` (its disassembly holds no vfmadd instruction; only ggml-cpu gets
  the AVX2/FMA flags), so every product is rounded before it is added, as torch does;
* independent candidate scales are searched all at once (an extra dimension), and the winner is
  picked in C's order with C's strict comparisons (the earliest best wins ties); ``make_qkx*_quants``
  tries its candidates one after the other, each measured from the offset of the best one so far.

The per-type drivers are in :mod:`~npft_lightning.quant.kquants` and :mod:`~npft_lightning.quant.iq4`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml-quants.c: a block whose largest |x| is below this is all zero


def f32(value: float) -> float:
    """``value`` rounded to float32 (a C ``float`` constant such as ``0.1f``), as a Python float."""
    return float(np.float32(value))


def _nearest_int(v: Tensor) -> Tensor:
    """C's ``nearest_int``: round half to even through the float32 sum ``v + 1.5·2^23`` (int32)."""
    bits = (v + 12582912.0).view(torch.int32)
    return (bits & 0x007FFFFF) - 0x00400000


def nearest_int(v: Tensor) -> Tensor:
    return _nearest_int(v.float())


def div(numerator: float | Tensor, denominator: Tensor) -> Tensor:
    """C's float32 ``numerator / denominator`` (torch computes ``scalar / tensor`` as the scalar times the
    rounded reciprocal, which is not the same float)."""
    if not isinstance(numerator, Tensor):
        numerator = torch.full_like(denominator, numerator)
    return torch.div(numerator, denominator)


def sqrtf(v: Tensor) -> Tensor:
    """C's correctly rounded float32 ``sqrtf``: the square root in float64, rounded once to float32
    (torch's float32 ``sqrt`` on the CPU is Sleef's, which may be one unit in the last place off)."""
    return v.double().sqrt().float()


def as_uint8(v: Tensor) -> Tensor:
    """C's conversion of an ``int`` to ``uint8_t`` (modulo 256), kept as int32."""
    return v & 0xFF


def as_int8(v: Tensor) -> Tensor:
    """C's conversion of an ``int`` to ``int8_t`` (two's complement wrap), kept as int32."""
    return ((v + 128) & 0xFF) - 128


def running_sum(terms: Tensor, start: Tensor | None = None) -> Tensor:
    """``start + terms[0] + terms[1] + ...`` left to right in float32 (C's ``for`` loop); ``start`` 0 by default."""
    total = torch.zeros_like(terms[0]) if start is None else start.clone()
    for term in terms.unbind(0):
        total.add_(term)
    return total


def first_argmax(values: Tensor) -> Tensor:
    """Index along dim 0 of the first largest value (C's ``if (v > best)`` scan), [B] int64."""
    return values.argmax(dim=0)


def signed_absmax(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(amax, max)``: the largest |x| of each block and the first value that has it, sign kept."""
    index = first_argmax(x.abs())[None]
    peak = x.gather(0, index)[0]
    return peak.abs(), peak


def _pick(better: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(better, new, old)


def make_qx_quants(x: Tensor, nmax: int, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: ``(scale [B], L [n, B] int32 in 0..2·nmax-1)``.

    ``weights`` None is C's ``qw = NULL`` (weights ``x²``). Symmetric grid ``scale · (L - nmax)``;
    the first least-squares scale, then the 18 scales ``-(nmax + 0.1·is) / max`` for is = -9..9.
    """
    amax, peak = signed_absmax(x)
    w = x * x if weights is None else weights
    iscale = div(-nmax, peak)
    l = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    lf = l.float()
    sumlx = running_sum(w * x * lf)
    suml2 = running_sum(w * lf * lf)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    codes = l + nmax
    steps = [s for s in range(-9, 10) if s != 0]
    # every candidate at once: [n, candidates, B]
    numer = np.array([-(np.float32(nmax) + np.float32(0.1) * np.float32(s)) for s in steps], dtype=np.float32)
    numer = torch.from_numpy(numer).to(x.device)
    isc = numer[:, None] / peak[None, :]
    lc = nearest_int(isc[None] * x[:, None]).clamp(-nmax, nmax - 1)
    lcf = lc.float()
    sumlx_c = running_sum(w[:, None] * x[:, None] * lcf)
    suml2_c = running_sum(w[:, None] * lcf * lcf)
    for c in range(len(steps)):
        take = (suml2_c[c] > 0) & (sumlx_c[c] * sumlx_c[c] > best * suml2_c[c])
        codes = _pick(take[None], lc[:, c] + nmax, codes)
        new_scale = sumlx_c[c] / suml2_c[c]
        scale = _pick(take, new_scale, scale)
        best = _pick(take, new_scale * sumlx_c[c], best)
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[None], torch.zeros_like(codes), codes)


def make_q3_quants(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: ``(scale [B], L [n, B] in 0..2·nmax-1)``.

    Weights ``x²``; the least-squares scale of the first rounding, then up to 5 sweeps that move one
    code at a time to its optimum when that lowers the weighted error. Sweeps run for every block
    (C stops a block after a sweep that changed nothing; further sweeps would change nothing either).
    """
    amax, peak = signed_absmax(x)
    iscale = div(-nmax, peak)
    L = nearest_int(iscale * x).clamp(-nmax, nmax - 1)
    w = x * x
    lf = L.float()
    sumlx = running_sum(w * x * lf)
    suml2 = running_sum(w * lf * lf)
    L = list(L.unbind(0))
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, li = x[i], w[i], L[i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / slx).clamp(-nmax, nmax - 1)
            nlf = new_l.float()
            slx2 = slx + wi * xi * nlf
            sl22 = sl2 + wi * nlf * nlf
            take = (slx > 0) & (new_l != L[i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = _pick(take, new_l, L[i])
            sumlx = _pick(take, slx2, sumlx)
            suml2 = _pick(take, sl22, suml2)
    codes = torch.stack(L) + nmax
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = amax < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[None], torch.zeros_like(codes), codes)


def make_qkx_quants(
    x: Tensor, weights: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``make_qkx2_quants`` / ``make_qkx3_quants`` (identical for given weights, ``use_mad=false``):
    ``(scale [B], the_min [B], L [n, B] int32 in 0..nmax)``, the block read as ``scale · L - the_min``.

    The min/max grid, then ``nstep + 1`` grids ``(rmin + rdelta·is + nmax) / (max - min)``, each
    refitted by weighted least squares (scale and offset), the one of least weighted squared error kept.
    The candidates run one after the other: C measures each from the offset of the best one so far.
    """
    lo = x.gather(0, x.argmin(dim=0)[None])[0]  # C keeps the first of equal values (the sign of a zero minimum)
    hi = x.gather(0, x.argmax(dim=0)[None])[0]
    sum_w = running_sum(weights[1:], start=weights[0])
    sum_x = running_sum(weights[1:] * x[1:], start=weights[0] * x[0])
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    flat = hi <= lo
    flat_min = -lo
    iscale = div(nmax, hi - lo)
    scale = div(1, iscale)
    L = nearest_int(iscale * (x - lo)).clamp(0, nmax)
    diff = scale * L.float() + lo - x
    best = running_sum(weights * (diff * diff))
    terms = x.new_empty(x.shape[0], 3, x.shape[1])  # w·l, w·l², w·l·x of one candidate
    for s in range(nstep + 1) if nstep >= 1 else ():
        numer = float(np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax))
        laux = nearest_int(div(numer, hi - lo) * (x - lo)).clamp(0, nmax)
        lf = laux.float()
        wl = torch.mul(weights, lf, out=terms[:, 0])
        torch.mul(wl, lf, out=terms[:, 1])
        torch.mul(wl, x, out=terms[:, 2])
        sum_l, sum_l2, sum_xl = running_sum(terms).unbind(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        cdiff = this_scale * lf + this_min - x
        error = running_sum(weights * (cdiff * cdiff))
        take = (D > 0) & (error < best)
        L = _pick(take[None], laux, L)
        best = _pick(take, error, best)
        scale = _pick(take, this_scale, scale)
        lo = _pick(take, this_min, lo)
    return (torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, flat_min, -lo),
            torch.where(flat[None], torch.zeros_like(L), L))


def make_qp_quants(x: Tensor, nmax: int, weights: Tensor) -> tuple[Tensor, Tensor]:
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: ``(scale [B], L [n, B] int32 0..255)``, the
    non-negative values ``x`` (the sub-block scales of a K-quant super-block) as ``scale · L``.

    The grid ``nmax / max`` and the 8 grids ``(0.1·is + nmax) / max``, the best of least weighted
    squared error kept, then up to 5 sweeps moving one code at a time (as :func:`make_q3_quants`).
    """
    top = torch.clamp_min(x.amax(dim=0), 0.0)  # C: max = MAX(max, x[i]) from 0
    iscale = div(nmax, top)
    L0 = as_uint8(nearest_int(iscale[None] * x))
    scale = div(1, iscale)
    diff = x - scale * L0.float()
    best = running_sum(weights * diff * diff)
    for s in [s for s in range(-4, 5) if s != 0]:
        iscale_s = div(f32(f32(f32(0.1) * s) + nmax), top)
        scale_s = div(1, iscale_s)
        l = nearest_int(iscale_s * x).clamp_max(nmax)
        d = x - scale_s * l.float()
        mse = running_sum(weights * d * d)
        take = mse < best
        best = _pick(take, mse, best)
        iscale = _pick(take, iscale_s, iscale)
    l = nearest_int(iscale * x).clamp_max(nmax)
    lf = l.float()
    sumlx = running_sum(weights * x * lf)
    suml2 = running_sum(weights * lf * lf)
    L = list(as_uint8(l).unbind(0))
    for _ in range(5):
        for i in range(x.shape[0]):
            xi, wi, li = x[i], weights[i], L[i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            new_l = nearest_int(xi * sl2 / slx).clamp_max(nmax)
            nlf = new_l.float()
            slx2 = slx + wi * xi * nlf
            sl22 = sl2 + wi * nlf * nlf
            take = (slx > 0) & (sl2 > 0) & (new_l != L[i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[i] = _pick(take, as_uint8(new_l), L[i])
            sumlx = _pick(take, slx2, sumlx)
            suml2 = _pick(take, sl22, suml2)
    codes = torch.stack(L)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    zero = top < GROUP_MAX_EPS
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[None], torch.zeros_like(codes), codes)


def best_index(values: Tensor, x: Tensor) -> Tensor:
    """``best_index_int8(16, values, x)``: index of the nearest of the sorted ``values`` (ties: the upper one)."""
    n = values.numel()
    upper = torch.searchsorted(values, x.contiguous(), right=True).clamp(1, n - 1)
    below, above = values[upper - 1], values[upper]
    index = torch.where(x - below < above - x, upper - 1, upper)
    index = torch.where(x <= values[0], torch.zeros_like(index), index)
    return torch.where(x >= values[-1], torch.full_like(index, n - 1), index)
