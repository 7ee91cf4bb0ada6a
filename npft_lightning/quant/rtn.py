"""Round-to-nearest (RTN) uniform quantization, with the GPTQ reference grid.

Per output row (or per group of ``group_size`` input columns of each row): the range is the
min-max of the values with 0 forced inside it; ``scale = (xmax - xmin) / (2^b - 1)``;
asymmetric ``zero = round(-xmin / scale)``, symmetric ``zero = (2^b)/2`` on a range made
symmetric around 0. An all-zero group gets the range [-1, 1]. ``q = clamp(round(w/scale) + zero,
0, 2^b - 1)``, dequantized as ``scale * (q - zero)``. Math is done in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(weight: Tensor, group_size: int | None) -> Tensor:
    """[rows, cols] -> [rows, n_groups, group] (one group of all columns when ``group_size`` is None)."""
    rows, cols = weight.shape
    g = cols if group_size is None else group_size
    if g <= 0 or cols % g != 0:
        raise ValueError(f"group_size={group_size} does not divide the {cols} input features; pick a divisor of {cols}")
    return weight.reshape(rows, cols // g, g)


def rtn_params(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> tuple[Tensor, Tensor]:
    """Scale and zero point per (row, group), each of shape [rows, n_groups], float32."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 2..8")
    w = _grouped(weight.float(), group_size)
    maxq = 2**bits - 1
    xmin = w.amin(dim=-1).clamp(max=0)
    xmax = w.amax(dim=-1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(empty, torch.full_like(xmax, 1.0), xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def rtn_encode(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Integer codes [rows, cols] (uint8) plus scale and zero [rows, n_groups]."""
    scale, zero = rtn_params(weight, bits, group_size, sym)
    w = _grouped(weight.float(), group_size)
    q = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, 2**bits - 1)
    return q.reshape(weight.shape).to(torch.uint8), scale, zero


def rtn_decode(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int | None = None) -> Tensor:
    """Float32 weight from codes and per-group scale/zero."""
    q = _grouped(codes.float(), group_size)
    return (scale[..., None] * (q - zero[..., None])).reshape(codes.shape)


def rtn_quantize(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """Fake-quantized copy of ``weight`` (same dtype and shape)."""
    codes, scale, zero = rtn_encode(weight, bits, group_size, sym)
    return rtn_decode(codes, scale, zero, group_size).to(weight.dtype)


def rtn_step(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """The quantization step Δ of each element's group, broadcast to [rows, cols] (float32)."""
    scale, _ = rtn_params(weight, bits, group_size, sym)
    g = weight.shape[1] if group_size is None else group_size
    return scale.repeat_interleave(g, dim=1)


def rtn_error(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """``rtn_quantize(weight) - weight`` in float32, bit for bit, with one full-size temporary.

    The same float32 operations as encode + decode (round, add zero, clamp, subtract zero,
    multiply by scale), done in place: the exact-error noise computes this for every decoder
    weight at every optimizer step.
    """
    w = _grouped(weight.float(), group_size)
    scale, zero = rtn_params(weight, bits, group_size, sym)
    scale, zero = scale[..., None], zero[..., None]
    q = torch.div(w, scale)
    q.round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale).sub_(w)
    return q.reshape(weight.shape)


def rtn_error_at(weight: Tensor, indices: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> Tensor:
    """``rtn_error(weight).reshape(-1)[indices]``, bit for bit, without the full-size error.

    The grid (scale, zero per row or group) needs the min/max of every group; the rounding is
    then done only at the flat ``indices``, with the same float32 operations as ``rtn_error``.
    This is what makes sparse exact-error noise cost a reduction instead of a quantization.
    """
    scale, zero = rtn_params(weight, bits, group_size, sym)
    cols = weight.shape[1]
    g = cols if group_size is None else group_size
    idx = indices.to(weight.device, torch.long)
    group = (idx // cols) * (cols // g) + (idx % cols) // g  # flat (row, group) of each index
    s, z = scale.reshape(-1)[group], zero.reshape(-1)[group]
    w = weight.reshape(-1)[idx].float()
    q = torch.div(w, s)
    return q.round_().add_(z).clamp_(0, 2**bits - 1).sub_(z).mul_(s).sub_(w)
