"""llama.cpp's non-linear 4-bit types IQ4_NL and IQ4_XS as weight quantizers, bit for bit what its quantizer writes.

Both map each weight to one of 16 fixed levels (``kvalues_iq4nl``, denser near 0) times a scale:

* IQ4_NL: blocks of 32 weights, one float16 scale each: ``x̂ = d · kvalues[q]`` (4.5 bits per weight);
* IQ4_XS: super-blocks of 256 (``in_features`` a multiple of 256), a float16 ``d`` and a 6-bit
  scale per block of 32: ``x̂ = (d · (ls - 32)) · kvalues[q]`` (4.25 bits).

The scale of a block is searched as ggml's ``quantize_row_iq4_nl_impl`` does with ``ntry = 7`` (what
``llama_model_quantize`` runs through ``ggml_quantize_chunk``): the least-squares scale of 16 grids,
each weight's squared error counting ``x²``, or with an importance matrix
``imatrix[column] · sqrt(σ² + x²)`` (σ² = 2·mean x² of the super-block).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import Tensor

from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml_base import GGMLFamily, GGMLTypeQuantizer
from npft_lightning.quant.ggml_search import (
    GROUP_MAX_EPS,
    best_index,
    by_rows,
    div,
    first_argmax,
    nearest_int,
    running_sum,
    signed_absmax,
    sqrtf,
)

KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # ggml-common.h kvalues_iq4nl
BLOCK = 32
SUPER = {"iq4_nl": 32, "iq4_xs": 256}  # weights that share a σ² (and, for IQ4_XS, a float16 d)
TYPE_SIZE = {"iq4_nl": 18, "iq4_xs": 136}
NTRY = 7


def _levels(device) -> Tensor:
    return torch.tensor(KVALUES, dtype=torch.float32, device=device)


def _block_scales(xt: Tensor, weights: Tensor, values: Tensor) -> Tensor:
    """The searched scale ``d`` [B] of each block of ``xt`` [32, B] (0 for an all-zero block)."""
    amax, peak = signed_absmax(xt)
    d = div(-peak, torch.full_like(peak, float(KVALUES[0])))  # ntry > 0: d = -max / values[0]
    q = values[best_index(KVALUES, div(1, d) * xt)]
    wq = weights * q
    sumqx = running_sum(wq * xt)
    sumq2 = running_sum(wq * q)
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    tries = torch.tensor([itry + KVALUES[0] for itry in range(-NTRY, NTRY + 1)], dtype=torch.float32, device=xt.device)
    ids = tries[:, None] / peak[None, :]  # [tries, B]: (itry + values[0]) / max
    qc = values[best_index(KVALUES, ids[None] * xt[:, None])]  # [32, tries, B]
    terms = xt.new_empty(xt.shape[0], 2, *ids.shape)
    wqc = torch.mul(weights[:, None], qc, out=terms[:, 1])
    torch.mul(wqc, xt[:, None], out=terms[:, 0])
    terms[:, 1].mul_(qc)
    sumqx_c, sumq2_c = running_sum(terms).unbind(0)
    for c in range(tries.numel()):
        take = (sumq2_c[c] > 0) & (sumqx_c[c] * sumqx_c[c] > best * sumq2_c[c])
        new_d = sumqx_c[c] / sumq2_c[c]
        d = torch.where(take, new_d, d)
        best = torch.where(take, new_d * sumqx_c[c], best)
    return torch.where(amax < GROUP_MAX_EPS, torch.zeros_like(d), d)


def _reciprocal(d: Tensor) -> Tensor:
    """``d ? 1/d : 0``."""
    return torch.where(d != 0, div(1, d), torch.zeros_like(d))


def iq4_encode(weight: Tensor, qtype: str, quant_weights: Tensor | None = None, name: str | None = None) -> dict[str, Tensor]:
    """``codes`` [rows, cols] uint8 (indices into :data:`KVALUES`), ``d`` [rows, cols / super] float32
    (float16 values) and, for IQ4_XS, ``sub_scales`` [rows, cols / 32] uint8 (ls, the block scale + 32)."""
    if qtype not in SUPER:
        raise ValueError(f"{qtype} is not an IQ4 type; use one of {', '.join(SUPER)}")
    rows, cols = weight.shape
    sup = SUPER[qtype]
    if cols % sup:
        where = f" of {name}" if name else ""
        raise UserError(f"quant {qtype}: its blocks hold {sup} weights of a row, but the {cols} input features{where} "
                        f"are not a multiple of {sup}; llama.cpp falls back to iq4_nl for such tensors: use "
                        f"quant=llamacpp_iq4_xs, which does the same")
    qw = None if quant_weights is None else quant_weights.detach().float().to(weight.device)
    return by_rows(lambda rows_: _encode_rows(rows_, qtype, qw), weight.detach().float(), 2 * NTRY + 1)


def _encode_rows(x: Tensor, qtype: str, quant_weights: Tensor | None) -> dict[str, Tensor]:
    rows, cols = x.shape
    sup = SUPER[qtype]
    values = _levels(x.device)
    xs = x.reshape(-1, sup).T.contiguous()
    sigma2 = running_sum(xs * xs) * (2.0 / sup)  # [S], C: sigma2 *= 2.f/super_block_size
    xt = x.reshape(-1, BLOCK).T.contiguous()  # [32, B]
    n_sub = sup // BLOCK
    if quant_weights is None:
        weights = xt * xt
    else:
        qw = quant_weights[None, :].expand(rows, cols).reshape(-1, BLOCK).T
        weights = qw * sqrtf(sigma2.repeat_interleave(n_sub)[None] + xt * xt)
    scales = _block_scales(xt, weights, values)
    if qtype == "iq4_nl":
        d = scales.half().float()
        codes = best_index(KVALUES, _reciprocal(scales)[None] * xt)
        return {"codes": codes.T.reshape(rows, cols).to(torch.uint8), "d": d.reshape(rows, cols // BLOCK)}
    scales = scales.reshape(-1, n_sub)
    picked = scales.gather(1, first_argmax(scales.abs().T)[:, None])[:, 0]
    max_scale = torch.where(picked.abs() > 0, picked, torch.zeros_like(picked))
    d = -max_scale / 32
    l = nearest_int(_reciprocal(d)[:, None] * scales).clamp(-32, 31)
    dl = (d[:, None] * l.float()).reshape(-1)
    codes = best_index(KVALUES, _reciprocal(dl)[None] * xt)
    return {"codes": codes.T.reshape(rows, cols).to(torch.uint8), "d": d.half().float().reshape(rows, cols // sup),
            "sub_scales": (l + 32).to(torch.uint8).reshape(rows, cols // BLOCK)}


def iq4_decode(payload: Mapping[str, Tensor], qtype: str) -> Tensor:
    """Float32 weight from :func:`iq4_encode`'s fields (the float32 operations of ``dequantize_row_iq4_*``)."""
    codes = payload["codes"]
    rows, cols = codes.shape
    q = _levels(codes.device)[codes.long()].reshape(rows, cols // BLOCK, BLOCK)
    if qtype == "iq4_nl":
        scale = payload["d"][..., None]
    else:
        sub = payload["sub_scales"].float() - 32
        scale = (payload["d"].repeat_interleave(SUPER[qtype] // BLOCK, dim=1) * sub)[..., None]
    return (scale * q).reshape(rows, cols)


def iq4_blocks(payload: Mapping[str, Tensor], qtype: str) -> np.ndarray:
    """The bytes of ggml's ``block_iq4_nl`` / ``block_iq4_xs``: uint8 [rows, cols / super · type_size]."""
    codes = payload["codes"].cpu().numpy()
    rows, cols = codes.shape
    sup = SUPER[qtype]
    n = rows * cols // sup
    q = codes.reshape(n, sup // BLOCK, BLOCK)
    qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, sup // 2)
    d = payload["d"].cpu().numpy().reshape(n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if qtype == "iq4_nl":
        parts = [d, qs]
    else:
        ls = payload["sub_scales"].cpu().numpy().astype(np.uint32).reshape(n, 8)
        high = ((ls >> 4) << (2 * np.arange(8, dtype=np.uint32))).sum(axis=1).astype(np.uint16)
        low = (ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)
        parts = [d, high[:, None].view(np.uint8), low.astype(np.uint8), qs]
    blocks = np.concatenate([np.asarray(p, dtype=np.uint8) for p in parts], axis=1)
    assert blocks.shape[1] == TYPE_SIZE[qtype]
    return np.ascontiguousarray(blocks.reshape(rows, -1))


class IQ4Quantizer(GGMLTypeQuantizer):
    """IQ4_NL or IQ4_XS (``qtype`` = iq4_nl, iq4_xs) as a weight quantizer
    (:class:`~npft_lightning.quant.ggml_base.GGMLTypeQuantizer`); its levels are not evenly spaced, so no ``step``."""

    family = GGMLFamily(SUPER, "iq4_nl", "an IQ4 type", iq4_encode, iq4_decode, iq4_blocks)
    bits = 4  # codes index the 16 levels
