"""llama.cpp's (ggml's) legacy block formats as weight quantizers: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0.

Each row of a weight matrix [out_features, in_features] is cut into blocks of 32 consecutive
weights; every block gets its own float16 scale ``d`` (and, for the ``_1`` types, a float16 minimum
``m``). The math is ggml's reference quantizer (``quantize_row_*_ref`` in ggml-quants.c), which is
also what the ``gguf`` Python package implements, operation for operation in float32:

* Q4_0 / Q5_0 (2^(b-1) = 8 / 16): ``max`` = the block's value of largest magnitude (its sign kept),
  ``d = max / -2^(b-1)``, ``q = min(2^b - 1, trunc(x / d + 2^(b-1) + 0.5))``, ``x̂ = d16 · (q - 2^(b-1))``;
* Q4_1 / Q5_1: ``d = (max - min) / (2^b - 1)``, ``q = min(2^b - 1, trunc((x - min) / d + 0.5))``,
  ``x̂ = d16 · q + m16``;
* Q8_0: ``d = max|x| / 127``, ``q = round-half-away(x / d)``, ``x̂ = d16 · q``;

where ``/ d`` is a multiplication by the float32 reciprocal ``1/d`` (0 for an all-zero block) and
``d16`` / ``m16`` are ``d`` / ``min`` rounded to float16. Codes are computed with the unrounded
``d``, values decoded with the rounded one, as ggml does. The fake-quant values are therefore bit
for bit ``gguf.quants.dequantize(gguf.quants.quantize(w, type), type)`` and :func:`ggml_blocks`
gives bit for bit the bytes a GGUF file stores (both tested against the ``gguf`` package).

With an importance matrix (llama.cpp's ``--imatrix``, :meth:`GGMLQuantizer.with_importance`) the
scale is searched instead, as ggml's ``quantize_row_q*_impl`` do (:func:`ggml_encode` given the importance):
each weight's squared error counts ``imatrix[column] · sqrt(σ² + x²)``, σ² the mean x² of its row;
Q4_0 / Q5_0 by ``make_qx_quants``, Q4_1 / Q5_1 by ``make_qkx3_quants``; Q8_0 ignores it, as ggml does.
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
    by_rows,
    make_qkx_quants,
    make_qx_quants,
    running_sum,
    sqrtf,
)

BLOCK = 32  # weights per block in every legacy ggml type


@dataclass(frozen=True)
class BlockFormat:
    """One ggml block type: code width, and whether it stores a minimum (affine) or is symmetric around 0."""

    bits: int
    affine: bool

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


# The ggml types the gguf package can write (its K-quants it only reads).
FORMATS = {
    "q4_0": BlockFormat(4, affine=False),
    "q4_1": BlockFormat(4, affine=True),
    "q5_0": BlockFormat(5, affine=False),
    "q5_1": BlockFormat(5, affine=True),
    "q8_0": BlockFormat(8, affine=False),
}


def _blocks(weight: Tensor, qtype: str, name: str | None = None) -> Tensor:
    """[rows, cols] float32 -> [rows, cols / 32, 32]."""
    rows, cols = weight.shape
    if cols % BLOCK:
        where = f" of {name}" if name else ""
        raise UserError(f"quant {qtype}: ggml blocks hold {BLOCK} weights of a row, but the {cols} input features{where} "
                        f"are not a multiple of {BLOCK}; use another quantizer (e.g. rtn4) for this model")
    return weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)


def _reciprocal(d: Tensor) -> Tensor:
    """``1/d`` in float32, 0 where ``d == 0`` (ggml's ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.ones_like(d) / d)


def _round_half_away(x: Tensor) -> Tensor:
    """C ``roundf``, with the same float32 steps as the gguf package's ``np_roundf``."""
    a = x.abs()
    floored = torch.floor(a)
    return torch.sign(x) * (floored + torch.floor(2 * (a - floored)))


def ggml_encode(weight: Tensor, qtype: str, quant_weights: Tensor | None = None, name: str | None = None) -> dict[str, Tensor]:
    """``codes`` [rows, cols] uint8 (< 2^bits; Q8_0's int8 values offset by 128), ``d`` and, for the
    affine types, ``m`` [rows, cols / 32] float32 holding the float16-rounded scale and minimum.

    ``quant_weights`` [cols]: the tensor's imatrix entry (the importance of each input column), None for
    none; with it the fields are the ones llama.cpp writes with ``--imatrix`` (Q8_0 ignores it, as ggml does).
    """
    fmt = FORMATS[qtype]
    x = _blocks(weight, qtype, name)
    if quant_weights is not None and fmt.bits != 8:
        qw = quant_weights.detach().float().to(weight.device)
        rows = x.reshape(weight.shape)
        sigma2 = running_sum((rows * rows).T) / rows.shape[1]  # [rows]: Σx² of the row in C's order, over n_per_row
        weights = qw[None, :] * sqrtf(sigma2[:, None] + rows * rows)  # of the whole matrix: C's order is per row
        return by_rows(lambda part, w: _encode_weighted_rows(part, w, fmt), rows, 1 if fmt.affine else 18, weights)  # make_qx: 18 scales
    if fmt.affine:
        lo = x.amin(dim=-1, keepdim=True)
        d = (x.amax(dim=-1, keepdim=True) - lo) / fmt.levels
        q = torch.trunc((x - lo) * _reciprocal(d) + 0.5).clamp(0, fmt.levels)
        extra = {"m": lo.half().float()[..., 0]}
    elif fmt.bits == 8:
        d = x.abs().amax(dim=-1, keepdim=True) / 127
        q = _round_half_away(x * _reciprocal(d)) + 128
        extra = {}
    else:
        half = 2 ** (fmt.bits - 1)
        peak = x.gather(-1, x.abs().argmax(dim=-1, keepdim=True))  # the first value of largest magnitude, sign kept
        d = peak / -half
        q = torch.trunc(x * _reciprocal(d) + (half + 0.5)).clamp(0, fmt.levels)
        extra = {}
    codes = q.to(torch.uint8).reshape(weight.shape)
    return {"codes": codes, "d": d.half().float()[..., 0], **extra}


def _encode_weighted_rows(x: Tensor, weights: Tensor, fmt: BlockFormat) -> dict[str, Tensor]:
    rows, cols = x.shape
    weights = weights.reshape(-1, BLOCK).T.contiguous()
    xt = x.reshape(-1, BLOCK).T.contiguous()
    if fmt.affine:
        scale, the_min, codes = make_qkx_quants(xt, weights, fmt.levels, -0.9, 0.05, 36)
        extra = {"m": (-the_min).half().float().reshape(rows, -1)}
    else:
        scale, codes = make_qx_quants(xt, 2 ** (fmt.bits - 1), weights)
        extra = {}
    return {"codes": codes.T.reshape(rows, cols).to(torch.uint8), "d": scale.half().float().reshape(rows, -1), **extra}


def ggml_decode(payload: Mapping[str, Tensor], qtype: str) -> Tensor:
    """Float32 weight from :func:`ggml_encode`'s fields (the same float32 products and sums as ggml)."""
    fmt = FORMATS[qtype]
    codes = payload["codes"]
    q = codes.float().reshape(codes.shape[0], -1, BLOCK)
    d = payload["d"][..., None]
    if fmt.affine:
        x = d * q + payload["m"][..., None]
    else:
        x = d * (q - 2 ** (fmt.bits - 1) if fmt.bits < 8 else q - 128)
    return x.reshape(codes.shape)


def ggml_blocks(payload: Mapping[str, Tensor], qtype: str) -> np.ndarray:
    """The bytes ggml stores for :func:`ggml_encode`'s fields: uint8 [rows, cols / 32 · type_size].

    Per block: ``d`` (fp16), [``m`` (fp16)], [Q5: the 32 fifth bits as a little-endian uint32],
    then the codes: Q8_0 one int8 each; Q4/Q5 two low nibbles per byte, code j in the low and code
    j + 16 in the high nibble of byte j.
    """
    fmt = FORMATS[qtype]
    codes = payload["codes"].cpu().numpy()
    rows = codes.shape[0]
    q = codes.reshape(rows, -1, BLOCK)
    parts = [payload["d"].cpu().numpy().astype(np.float16)[..., None].view(np.uint8)]
    if fmt.affine:
        parts.append(payload["m"].cpu().numpy().astype(np.float16)[..., None].view(np.uint8))
    if fmt.bits == 8:
        parts.append(q ^ np.uint8(0x80))  # code - 128 as int8, two's complement
    else:
        if fmt.bits == 5:
            parts.append(np.packbits((q >> 4) & 1, axis=-1, bitorder="little"))
        low = q & np.uint8(0x0F)
        parts.append(low[..., : BLOCK // 2] | (low[..., BLOCK // 2 :] << np.uint8(4)))
    return np.ascontiguousarray(np.concatenate(parts, axis=-1).reshape(rows, -1))


class GGMLQuantizer(GGMLTypeQuantizer):
    """A ggml legacy block type (``qtype`` = q4_0, q4_1, q5_0, q5_1 or q8_0) as an ordinary weight quantizer
    (:class:`~npft_lightning.quant.ggml_base.GGMLTypeQuantizer`), with the uniform step noise's :meth:`step`."""

    family = GGMLFamily(FORMATS, "q4_0", "a ggml block type that can be written", ggml_encode, ggml_decode, ggml_blocks)

    def step(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """Per-element quantization step Δ = |d16| of the element's block, [rows, cols] float32 (0 in an all-zero block)."""
        return self.encode_weight(weight, name=name)["d"].abs().repeat_interleave(BLOCK, dim=1)
