"""ggml's per-block scale searches (``make_qx_quants``, ``make_qkx2_quants`` / ``make_qkx3_quants``,
``make_qp_quants``, ``make_q3_quants`` and the IQ4 grid search of ggml-quants.c), vectorized over blocks.

Every function takes the blocks transposed, ``x`` [n, B] (element ``i`` of block ``b`` at ``x[i, b]``),
so that C's element loop becomes a loop over n contiguous rows of B values, and returns what the C
function returns for each of the B blocks. The arithmetic is C's, operation for operation in float32:

* sums are accumulated in C's order, one element after the other (``_running_sum``), never by a
  reduction tree: their last bits decide which candidate scale wins;
* products keep C's association (``w*x*l`` is ``(w*x)*l``) and integer codes become floats where
  C converts them; ``nearest_int`` is C's bit trick (``_nearest_int``), or ``torch.round`` where the
  value is bounded (both round half to even for |v| <= 4194303, the range C's ``nearest_int`` asserts),
  integer narrowing to ``uint8`` / ``int8`` wraps as in C;
* division and square roots are correctly rounded (``div``, ``sqrtf``), as C's ``/`` and ``sqrtf``;
* no fused multiply-add: the libggml-base that llama.cpp's quantizer runs (``ggml_quantize_chunk``)
  is built without ``-mfma`` (its disassembly holds no vfmadd instruction; only ggml-cpu gets
  the AVX2/FMA flags), so every product is rounded before it is added, as torch does;
* independent candidate scales are searched all at once (an extra dimension), and the winner is
  picked in C's order with C's strict comparisons (the earliest best wins ties); ``make_qkx*_quants``
  tries its candidates one after the other, each measured from the offset of the best one so far.

Speed (they run on every weight at each step of a ``quant_error`` recipe): the hot searches loop over
the n elements of the blocks, each step one torch call on a buffer of [candidates, B] or [B] values
that stays in the cache, instead of whole [n, candidates, B] temporaries that stream through memory;
per-row and per-super-block sums of a whole matrix are taken once, before it is cut into chunks of rows.

The per-type drivers are in :mod:`~npft_lightning.quant.kquants` and :mod:`~npft_lightning.quant.iq4`.
"""

from __future__ import annotations

import functools

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


# Weights x candidate scales searched at once. The searches loop over the elements of the blocks with buffers of
# [candidates, blocks] (make_qx_quants: 19 x 7k for 32-weight blocks, about 0.5 MiB, which stays in the cache) or
# [blocks] (make_qkx_quants: 131k for one candidate at a time), large enough that each torch call does real work.
CHUNK_VALUES = 1 << 22


def by_rows(encode, x: Tensor, candidates: int, *aligned: Tensor) -> dict[str, Tensor]:
    """``encode(rows, *aligned_rows)`` (fields whose first dimension is the row) over chunks of the rows of ``x``
    (and the same rows of each ``aligned`` tensor), concatenated: each chunk holds at most :data:`CHUNK_VALUES`
    weights times the ``candidates`` scales searched side by side."""
    rows, cols = x.shape
    size = max(1, min(rows, CHUNK_VALUES // (cols * candidates)))
    parts = [encode(*chunks) for chunks in zip(x.split(size), *(a.split(size) for a in aligned))]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _pick(better: Tensor, new: Tensor, old: Tensor) -> Tensor:
    return torch.where(better, new, old)


def make_qx_quants(x: Tensor, nmax: int, weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: ``(scale [B], L [n, B] int32 in 0..2·nmax-1)``.

    ``weights`` None is C's ``qw = NULL`` (weights ``x²``). Symmetric grid ``scale · (L - nmax)``;
    the first least-squares scale, then the 18 scales ``-(nmax + 0.1·is) / max`` for is = -9..9.
    Here ``|iscale · x| <= nmax + 1`` (``max`` is the largest |x|), where C's ``nearest_int`` is
    ``torch.round`` (half to even): codes are rounded in float32, and only for the winning scale.
    The 19 scales are measured side by side, one element of the blocks at a time (C's order of the sums),
    in buffers of [19, B] that stay in the cache (:data:`CHUNK_VALUES`).
    """
    amax, peak = signed_absmax(x)
    w = x * x if weights is None else weights
    wx = w * x
    steps = [s for s in range(-9, 10) if s != 0]
    numer = np.array([-(np.float32(nmax) + np.float32(0.1) * np.float32(s)) for s in steps], dtype=np.float32)
    # scale 0: C's first -nmax / max; then the candidates, in C's order
    iscales = torch.cat([div(-nmax, peak)[None], torch.from_numpy(numer).to(x.device)[:, None] / peak[None, :]])
    sums = torch.zeros(2, *iscales.shape, dtype=x.dtype, device=x.device)
    sumlx, suml2 = sums.unbind(0)
    l, term = torch.empty_like(iscales), torch.empty_like(iscales)
    for xi, wi, wxi in zip(x, w, wx):  # sumlx += w·x·l, suml2 += w·l·l, as (w·x)·l and (w·l)·l
        torch.mul(iscales, xi, out=l).round_().clamp_(-nmax, nmax - 1)
        sumlx.add_(torch.mul(l, wxi, out=term))
        suml2.add_(torch.mul(l, wi, out=term).mul_(l))
    ratio = sumlx / suml2
    first_scale = torch.where(suml2[0] != 0, ratio[0], torch.zeros_like(ratio[0]))
    best = first_scale * sumlx[0]
    gains, bests, positive = sumlx * sumlx, ratio * sumlx, suml2 > 0
    winner = torch.zeros_like(best, dtype=torch.long)
    for c in range(1, len(iscales)):  # C's scan: a later scale wins only if strictly better
        take = positive[c] & (gains[c] > best * suml2[c])
        best = _pick(take, bests[c], best)
        winner.masked_fill_(take, c)
    scale = _pick(winner == 0, first_scale, ratio.gather(0, winner[None])[0])
    iscale = iscales.gather(0, winner[None])[0]
    codes = torch.round(iscale * x).clamp_(-nmax, nmax - 1).to(torch.int32) + nmax
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
    # C's nearest_int is round half to even for |v| <= 4194303 (it asserts so); v <= nmax + 1 here
    L = torch.round(iscale * (x - lo)).clamp_(0, nmax)
    diff = scale * L + lo - x
    best = running_sum(weights * (diff * diff))
    # L of the best grid so far is round((x - L_min) · L_iscale): kept as those two [B] values, rounded again at the end
    L_min, L_iscale = lo, iscale
    # One candidate at a time, one element of the blocks at a time (C's order of the sums), in [B] buffers.
    laux = torch.empty_like(x)
    sums = x.new_empty(3, x.shape[1])
    sum_l, sum_l2, sum_xl = sums.unbind(0)
    wl, term, error = (torch.empty_like(lo) for _ in range(3))
    for s in range(nstep + 1) if nstep >= 1 else ():
        numer = float(np.float32(rmin) + np.float32(rdelta) * np.float32(s) + np.float32(nmax))
        candidate = div(numer, hi - lo)
        sums.zero_()
        for xi, wi, li in zip(x, weights, laux):  # sum_l += w·l, sum_l2 += (w·l)·l, sum_xl += (w·l)·x
            torch.sub(xi, lo, out=li).mul_(candidate).round_().clamp_(0, nmax)
            sum_l.add_(torch.mul(wi, li, out=wl))
            sum_l2.add_(torch.mul(wl, li, out=term))
            sum_xl.add_(torch.mul(wl, xi, out=term))
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        error.zero_()
        for xi, wi, li in zip(x, weights, laux):  # error += w·diff², diff = scale·l + min - x
            torch.mul(this_scale, li, out=term).add_(this_min).sub_(xi)
            error.add_(term.mul_(term).mul_(wi))
        take = (D > 0) & (error < best)
        L_min, L_iscale = _pick(take, lo, L_min), _pick(take, candidate, L_iscale)
        best = _pick(take, error, best)
        scale = _pick(take, this_scale, scale)
        lo = _pick(take, this_min, lo)
    L = torch.sub(x, L_min, out=laux).mul_(L_iscale).round_().clamp_(0, nmax)
    return (torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, flat_min, -lo),
            torch.where(flat[None], torch.zeros_like(L), L).to(torch.int32))


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


@functools.lru_cache(maxsize=None)
def _index_thresholds(levels: tuple[int, ...]) -> np.ndarray:
    """For sorted integer ``levels``: threshold k is the least float32 x that ``best_index_int8`` maps above level k.

    C picks the upper of two neighbours a < b unless ``x - a < b - x`` (both rounded to float32); the choice
    is monotone in x, so the index of x is the number of thresholds <= x.
    """
    out = []
    for a, b in zip(levels, levels[1:]):
        a32, b32 = np.float32(a), np.float32(b)

        def upper(v: np.float32) -> bool:
            return not (np.float32(v - a32) < np.float32(b32 - v))

        v = np.float32((a + b) / 2)
        while upper(np.nextafter(v, a32)):
            v = np.nextafter(v, a32)
        while not upper(v):
            v = np.nextafter(v, b32)
        out.append(v)
    return np.array(out, dtype=np.float32)


def best_index(levels: tuple[int, ...], x: Tensor) -> Tensor:
    """``best_index_int8(n, levels, x)``: index (int64) of the nearest of the sorted integer ``levels``, C's
    float32 comparison deciding near-ties (the upper one on a tie)."""
    thresholds = torch.from_numpy(_index_thresholds(tuple(levels))).to(x.device)
    return torch.searchsorted(thresholds, x.contiguous(), right=True)
