"""llama.cpp's K-quants (Q3_K, Q4_K, Q5_K, Q6_K) as weight quantizers, bit for bit what its quantizer writes.

A row of a weight matrix [out_features, in_features] is cut into super-blocks of 256 weights
(``in_features`` must be a multiple of 256), each holding sub-blocks with their own 6- or 8-bit
scale, the sub-block scales themselves quantized against one float16 super-block scale:

* Q4_K / Q5_K: 8 sub-blocks of 32, ``x̂ = (d·sc)·q - (dmin·m)``, q < 16 / 32, sc and m 6-bit,
  d and dmin float16 (4.5 / 5.5 bits per weight);
* Q3_K: 16 sub-blocks of 16, ``x̂ = (d·(sc - 32))·(q - 4)``, q < 8, sc 6-bit (3.4375 bits);
* Q6_K: 16 sub-blocks of 16, ``x̂ = (d·sc)·(q - 32)``, q < 64, sc int8 (6.5625 bits).

The scales are searched, not rounded: ggml's ``quantize_row_q*_K_ref`` (no importance matrix) and
``quantize_row_q*_K_impl`` (with one: each weight's squared error counts ``imatrix[column] ·
sqrt(σ² + x²)``, Q6_K ``imatrix[column]``), with the searches of
:mod:`~npft_lightning.quant.ggml_search`, vectorized over all sub-blocks of the matrix. The codes are
then rounded once more against the float16-rounded scales, as ggml does. :func:`kquant_blocks` packs the
fields into the bytes of ggml's ``block_q*_K``; the tests compare them with ``ggml_quantize_chunk``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml_base import GGMLFamily, GGMLTypeQuantizer
from npft_lightning.quant.ggml_search import (
    GROUP_MAX_EPS,
    as_int8,
    as_uint8,
    by_rows,
    div,
    first_argmax,
    make_q3_quants,
    make_qkx_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    running_sum,
    sqrtf,
)

QK_K = 256  # weights per super-block


@dataclass(frozen=True)
class KFormat:
    bits: int
    sub: int  # weights per sub-block
    affine: bool  # a minimum per sub-block (Q4_K, Q5_K)
    type_size: int  # bytes per super-block in a GGUF file

    @property
    def n_sub(self) -> int:
        return QK_K // self.sub


FORMATS = {
    "q3_k": KFormat(3, 16, affine=False, type_size=110),
    "q4_k": KFormat(4, 32, affine=True, type_size=144),
    "q5_k": KFormat(5, 32, affine=True, type_size=176),
    "q6_k": KFormat(6, 16, affine=False, type_size=210),
}


def check_superblocks(cols: int, qtype: str, name: str | None = None) -> None:
    if cols % QK_K:
        where = f" of {name}" if name else ""
        raise UserError(f"quant {qtype}: K-quant super-blocks hold {QK_K} weights of a row, but the {cols} input "
                        f"features{where} are not a multiple of {QK_K}; llama.cpp falls back to another type for such "
                        f"tensors: use quant=llamacpp_<file type> (e.g. llamacpp_q4_k_m), which does the same")


def fp16(x: Tensor) -> Tensor:
    """``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(x))``: round to float16 (to nearest even), back to float32."""
    return x.half().float()


# ---------------------------------------------------------------------------------------------
# the 12 scale bytes of Q4_K / Q5_K and of Q3_K
# ---------------------------------------------------------------------------------------------


def pack_scale_min_k4(ls: Tensor, lm: Tensor) -> Tensor:
    """Q4_K / Q5_K: 8 scales and 8 mins [S, 8] (ints, 6-bit) -> the block's 12 ``scales`` bytes [S, 12] (int32)."""
    q = torch.zeros(*ls.shape[:-1], 12, dtype=torch.int32, device=ls.device)
    q[:, :4] = as_uint8(ls[:, :4])
    q[:, 4:8] = as_uint8(lm[:, :4])
    q[:, 8:] = as_uint8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    q[:, :4] = as_uint8(q[:, :4] | ((as_uint8(ls[:, 4:]) >> 4) << 6))
    q[:, 4:8] = as_uint8(q[:, 4:8] | ((as_uint8(lm[:, 4:]) >> 4) << 6))
    return q


def unpack_scale_min_k4(q: Tensor) -> tuple[Tensor, Tensor]:
    """``get_scale_min_k4`` for j = 0..7: the 12 bytes [S, 12] -> (scales, mins) [S, 8] (int32, < 64)."""
    sc_low, m_low = q[:, :4] & 63, q[:, 4:8] & 63
    sc_high = (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)
    m_high = (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)
    return torch.cat([sc_low, sc_high], dim=1), torch.cat([m_low, m_high], dim=1)


def pack_scales_q3(ls: Tensor) -> Tensor:
    """Q3_K: 16 scales [S, 16] (0..63, the value + 32) -> the block's 12 ``scales`` bytes [S, 12] (int32)."""
    q = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    q[:, :8] = (ls[:, :8] & 0xF) | ((ls[:, 8:] & 0xF) << 4)
    high = (ls >> 4) & 3
    for j in range(16):  # byte 8 + j % 4, bits 2·(j / 4)
        q[:, 8 + j % 4] |= high[:, j] << (2 * (j // 4))
    return as_uint8(q)


def unpack_scales_q3(q: Tensor) -> Tensor:
    """The 12 bytes [S, 12] -> the 16 signed scales [S, 16] (int32, -32..31), as ``dequantize_row_q3_K``."""
    low = torch.cat([q[:, :8] & 0xF, q[:, :8] >> 4], dim=1)
    j = torch.arange(16, device=q.device)
    high = (q[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    return as_int8(low | (high << 4)) - 32


# ---------------------------------------------------------------------------------------------
# encode
# ---------------------------------------------------------------------------------------------


def _sub_blocks(x: Tensor, sub: int) -> Tensor:
    """[R, cols] -> [sub, R·cols/sub]: sub-block b's element i at [i, b] (the layout of ggml_search)."""
    return x.reshape(-1, sub).T.contiguous()


def _superblock_sigma2(x: Tensor) -> Tensor:
    """``2·Σx²/256`` of each super-block, summed in C's order: [S]."""
    xt = _sub_blocks(x, QK_K)
    return 2 * running_sum(xt * xt) / QK_K


def _importance_weights(x: Tensor, quant_weights: Tensor) -> Tensor:
    """``qw[col] · sqrt(σ² + x²)`` of each weight (σ² of its super-block), [rows, cols]: computed once for the whole
    matrix (the sums of σ² run over 256 weights; per chunk of rows they would cost as many small steps again)."""
    rows, cols = x.shape
    sigma2 = _superblock_sigma2(x).reshape(rows, cols // QK_K, 1).expand(rows, cols // QK_K, QK_K).reshape(rows, cols)
    return quant_weights[None, :] * sqrtf(sigma2 + x * x)


def _positive_max(values: Tensor) -> Tensor:
    """C's ``if (v > best) best = v`` from ``best = 0`` over each row of ``values`` [S, n] (a +0 when none is positive)."""
    top = values.amax(dim=1)
    return torch.where(top > 0, top, torch.zeros_like(top))


def _requantize(xt: Tensor, L: Tensor, d: Tensor, dm: Tensor | None, lo: int, hi: int, offset: int) -> Tensor:
    """ggml's last pass: codes ``clamp(nearest_int((x + dm) / d), lo, hi) + offset`` against the
    float16-rounded sub-block scales ``d`` [B] (and minima ``dm``); sub-blocks with ``d == 0`` keep ``L``."""
    shifted = xt if dm is None else xt + dm[None]
    codes = nearest_int(shifted / d[None]).clamp(lo, hi) + offset
    return torch.where((d != 0)[None], codes, L)


def _encode_q4_q5(x: Tensor, fmt: KFormat, importance: Tensor | None) -> dict[str, Tensor]:
    rows, cols = x.shape
    S = rows * cols // QK_K
    nmax = 2**fmt.bits - 1
    xt = _sub_blocks(x, 32)  # [32, 8S]
    if importance is None:  # quantize_row_q{4,5}_K_ref
        sum_x2 = running_sum(xt * xt)
        weights = sqrtf(sum_x2 / 32)[None] + xt.abs()
        rmin, nstep = (-1.0, 20) if fmt.bits == 4 else (-0.5, 15)
        scales, mins, L = make_qkx_quants(xt, weights, nmax, rmin, 0.1, nstep)
        scales, mins = scales.reshape(S, 8), mins.reshape(S, 8)
        max_scale, max_min = _positive_max(scales), _positive_max(mins)
        inv_scale = torch.where(max_scale > 0, div(63.0, max_scale), torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, div(63.0, max_min), torch.zeros_like(max_min))
        ls = as_uint8(nearest_int(inv_scale[:, None] * scales)).clamp_max(63)
        lm = as_uint8(nearest_int(inv_min[:, None] * mins)).clamp_max(63)
        d, dmin = fp16(max_scale / 63.0), fp16(max_min / 63.0)
    else:  # quantize_row_q{4,5}_K_impl
        weights = _sub_blocks(importance, 32)
        sw = running_sum(weights).reshape(S, 8).T.contiguous()
        scales, mins, L = make_qkx_quants(xt, weights, nmax, -0.9, 0.05, 36)
        d_block, ls = make_qp_quants(scales.reshape(S, 8).T.contiguous(), 63, sw)
        m_block, lm = make_qp_quants(mins.reshape(S, 8).T.contiguous(), 63, sw)
        ls, lm = ls.T, lm.T
        if fmt.bits == 5:
            ls, lm = ls.clamp_max(63), lm.clamp_max(63)
        d, dmin = fp16(d_block), fp16(m_block)
    sc, m = unpack_scale_min_k4(pack_scale_min_k4(ls, lm))
    d_sub = (d[:, None] * sc.float()).reshape(-1)
    dm_sub = (dmin[:, None] * m.float()).reshape(-1)
    L = _requantize(xt, L, d_sub, dm_sub, 0, nmax, 0)
    return {"codes": L.T.reshape(rows, cols), "d": d, "dmin": dmin, "sub_scales": sc, "sub_mins": m}


def _encode_q3(x: Tensor, fmt: KFormat, importance: Tensor | None) -> dict[str, Tensor]:
    rows, cols = x.shape
    S = rows * cols // QK_K
    xt = _sub_blocks(x, 16)  # [16, 16S]
    if importance is None:  # quantize_row_q3_K_ref
        scales, L = make_q3_quants(xt, 4)
        scales = scales.reshape(S, 16)
        peak = scales.gather(1, first_argmax(scales.abs().T)[:, None])[:, 0]
        iscale = div(-32.0, peak)
        ls = (as_int8(nearest_int(iscale[:, None] * scales)).clamp(-32, 31) + 32)
        ls = torch.where((peak != 0)[:, None], ls, torch.zeros_like(ls))
        d = torch.where(peak != 0, fp16(div(1, iscale)), torch.zeros_like(peak))
    else:  # quantize_row_q3_K_impl
        weights = _sub_blocks(importance, 16)
        sw = running_sum(weights).reshape(S, 16).T.contiguous()
        scales, L = make_qx_quants(xt, 4, weights)
        d_block, ls = make_qx_quants(scales.reshape(S, 16).T.contiguous(), 32, sw)
        ls, d = ls.T, fp16(d_block)
    sc = unpack_scales_q3(pack_scales_q3(ls))
    d_sub = (d[:, None] * sc.float()).reshape(-1)
    L = _requantize(xt, L, d_sub, None, -4, 3, 4)
    return {"codes": L.T.reshape(rows, cols), "d": d, "sub_scales": sc + 32}


def _encode_q6(x: Tensor, fmt: KFormat, importance: Tensor | None) -> dict[str, Tensor]:
    rows, cols = x.shape
    S = rows * cols // QK_K
    xt = _sub_blocks(x, 16)
    weights = None if importance is None else _sub_blocks(importance, 16)
    scales, L = make_qx_quants(xt, 32, weights)  # ref: weights x²; impl: the importance alone
    scales = scales.reshape(S, 16)
    peak = scales.gather(1, first_argmax(scales.abs().T)[:, None])[:, 0]
    zero = peak.abs() < GROUP_MAX_EPS
    iscale = div(-128.0, peak)
    d = torch.where(zero, torch.zeros_like(peak), fp16(div(1, iscale)))
    sc = as_int8(nearest_int(iscale[:, None] * scales).clamp_max(127))
    sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
    d_sub = (d[:, None] * sc.float()).reshape(-1)
    L = _requantize(xt, L, d_sub, None, -32, 31, 32)
    L = torch.where(zero.repeat_interleave(16)[None], torch.zeros_like(L), L)  # an all-zero block is memset
    return {"codes": L.T.reshape(rows, cols), "d": d, "sub_scales": as_uint8(sc)}


_ENCODERS = {3: _encode_q3, 4: _encode_q4_q5, 5: _encode_q4_q5, 6: _encode_q6}
_PARALLEL_CANDIDATES = {3: 18, 4: 1, 5: 1, 6: 18}  # scales searched side by side (make_qx_quants: 18; make_qkx: one at a time)


def kquant_encode(weight: Tensor, qtype: str, quant_weights: Tensor | None = None, name: str | None = None) -> dict[str, Tensor]:
    """The fields of a K-quant: ``codes`` [rows, cols] uint8 (< 2^bits), ``d`` [rows, cols / 256] float32
    (float16 values), ``sub_scales`` [rows, cols / sub] uint8 (Q3_K: sc + 32; Q6_K: the int8 byte),
    and for Q4_K / Q5_K ``dmin`` and ``sub_mins``. ``quant_weights``: the importance of each input
    column [cols] (llama.cpp's imatrix entry for this tensor), None for none."""
    fmt = FORMATS[qtype]
    rows, cols = weight.shape
    check_superblocks(cols, qtype, name)
    x = weight.detach().float()
    encode = _ENCODERS[fmt.bits]
    if quant_weights is None:
        fields = by_rows(lambda rows_: encode(rows_, fmt, None), x, _PARALLEL_CANDIDATES[fmt.bits])
    else:  # each weight's importance: Q6_K the column's alone, the others qw[col] · sqrt(σ² + x²)
        qw = quant_weights.detach().float().to(x.device)
        importance = qw[None, :].expand(rows, cols) if fmt.bits == 6 else _importance_weights(x, qw)
        fields = by_rows(lambda rows_, w: encode(rows_, fmt, w), x, _PARALLEL_CANDIDATES[fmt.bits], importance)
    n_sb = cols // QK_K
    out = {"codes": fields["codes"].to(torch.uint8), "d": fields["d"].reshape(rows, n_sb)}
    if fmt.affine:
        out["dmin"] = fields["dmin"].reshape(rows, n_sb)
    out["sub_scales"] = fields["sub_scales"].reshape(rows, -1).to(torch.uint8)
    if fmt.affine:
        out["sub_mins"] = fields["sub_mins"].reshape(rows, -1).to(torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------
# decode, bytes
# ---------------------------------------------------------------------------------------------


def kquant_decode(payload: Mapping[str, Tensor], qtype: str) -> Tensor:
    """Float32 weight from :func:`kquant_encode`'s fields, with the float32 operations of ``dequantize_row_q*_K``."""
    fmt = FORMATS[qtype]
    codes = payload["codes"]
    rows, cols = codes.shape
    q = codes.float().reshape(rows, cols // QK_K, fmt.n_sub, fmt.sub)
    d = payload["d"][..., None, None]
    sc = payload["sub_scales"].reshape(rows, cols // QK_K, fmt.n_sub, 1)
    if fmt.affine:
        m = payload["sub_mins"].reshape(rows, cols // QK_K, fmt.n_sub, 1)
        x = (d * sc.float()) * q - payload["dmin"][..., None, None] * m.float()
    elif fmt.bits == 3:
        x = (d * (sc.float() - 32)) * (q - 4)
    else:
        x = (d * as_int8(sc.int()).float()) * (q - 32)
    return x.reshape(rows, cols)


def kquant_blocks(payload: Mapping[str, Tensor], qtype: str) -> np.ndarray:
    """The bytes of ggml's ``block_q*_K`` for :func:`kquant_encode`'s fields: uint8 [rows, cols / 256 · type_size]."""
    fmt = FORMATS[qtype]
    codes = payload["codes"].cpu().to(torch.int32)
    rows, cols = codes.shape
    S = rows * cols // QK_K
    L = codes.reshape(S, QK_K)
    d = payload["d"].cpu().reshape(S).numpy().astype(np.float16).view(np.uint8).reshape(S, 2)
    sc = payload["sub_scales"].cpu().to(torch.int32).reshape(S, fmt.n_sub)
    parts: list[np.ndarray] = []
    if fmt.affine:
        m = payload["sub_mins"].cpu().to(torch.int32).reshape(S, fmt.n_sub)
        dmin = payload["dmin"].cpu().reshape(S).numpy().astype(np.float16).view(np.uint8).reshape(S, 2)
        parts += [d, dmin, pack_scale_min_k4(sc, m).numpy()]
        chunks = L.reshape(S, 4, 2, 32)  # 64-weight chunks: weights l and l + 32 share byte l
        if fmt.bits == 5:
            high = (chunks >> 4) & 1  # bit 2·chunk (+1 for the second half) of qh[l]
            shift = (2 * torch.arange(4)[:, None] + torch.arange(2)[None, :])[None, :, :, None]
            parts.append((high << shift).sum(dim=(1, 2)).numpy())
        low = chunks & 0xF
        parts.append((low[:, :, 0] | (low[:, :, 1] << 4)).reshape(S, 128).numpy())
    elif fmt.bits == 3:
        hmask = (L > 3).to(torch.int32).reshape(S, 8, 32)  # weight j: byte j % 32, bit j / 32
        parts.append((hmask << torch.arange(8)[None, :, None]).sum(dim=1).numpy())
        low = (L & 3).reshape(S, 2, 4, 32)  # 128-weight halves: weights l, l+32, l+64, l+96 share a byte
        parts.append((low << (2 * torch.arange(4))[None, None, :, None]).sum(dim=2).reshape(S, 64).numpy())
        parts += [pack_scales_q3(sc).numpy(), d]
    else:
        halves = L.reshape(S, 2, 4, 32)
        low = halves & 0xF
        ql = torch.stack([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)
        qh = ((halves >> 4) << (2 * torch.arange(4))[None, None, :, None]).sum(dim=2)
        parts += [ql.reshape(S, 128).numpy(), qh.reshape(S, 64).numpy(), sc.numpy(), d]
    blocks = np.concatenate([np.asarray(p).astype(np.uint8) for p in parts], axis=1)
    assert blocks.shape[1] == fmt.type_size
    return np.ascontiguousarray(blocks.reshape(rows, -1))


class KQuantizer(GGMLTypeQuantizer):
    """A llama.cpp K-quant (``qtype`` = q3_k, q4_k, q5_k or q6_k) as a weight quantizer
    (:class:`~npft_lightning.quant.ggml_base.GGMLTypeQuantizer`), with the uniform step noise's :meth:`step`."""

    family = GGMLFamily(FORMATS, "q4_k", "a K-quant", kquant_encode, kquant_decode, kquant_blocks)

    def step(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """Per-element quantization step ``|d · sc|`` of the element's sub-block, [rows, cols] float32."""
        fields = self.encode_weight(weight, name=name)
        fmt = FORMATS[self.qtype]
        sc = fields["sub_scales"].float()
        if fmt.bits == 3:
            sc = sc - 32
        elif fmt.bits == 6:
            sc = as_int8(fields["sub_scales"].int()).float()
        step = fields["d"].repeat_interleave(fmt.n_sub, dim=1) * sc
        return step.abs().repeat_interleave(fmt.sub, dim=1)
