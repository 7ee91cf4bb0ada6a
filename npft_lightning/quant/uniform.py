"""The RTN quantizer object (configured from ``conf/quant/rtn*.yaml``)."""

from __future__ import annotations

from typing import Mapping

from torch import Tensor

from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.rtn import (
    rtn_decode,
    rtn_encode,
    rtn_error,
    rtn_error_at,
    rtn_step,
)


class UniformGridQuantizer(WeightQuantizer):
    """Shared set-up of quantizers on the RTN grid: ``bits``, ``group_size`` (None = per channel), ``sym``."""

    family = "uniform"

    def __init__(self, bits: int = 4, group_size: int | None = None, sym: bool = False, name: str | None = None):
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"quant bits={bits} is outside 2..8; use a value from 2 to 8")
        if group_size is not None and int(group_size) <= 0:
            raise ValueError(f"quant group_size={group_size} must be a positive divisor of the input features, or null")
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.sym = bool(sym)
        self.name = name or default_name(self.family, self.bits, self.group_size, self.sym)


class RTN(UniformGridQuantizer):
    """Round-to-nearest, per output channel (``group_size=None``) or per group of input columns."""

    family = "rtn"

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """``codes`` [rows, cols] uint8, ``scale`` / ``zero`` [rows, n_groups] float32."""
        return rtn_fields(weight, self.bits, self.group_size, self.sym)

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return decode_rtn_fields(payload, self.group_size)

    def step(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """Per-element quantization step Δ (used by the ``uniform_step`` noise); the same grid for every tensor."""
        return rtn_step(weight, self.bits, self.group_size, self.sym)

    def quantization_error(self, weight: Tensor, indices: Tensor | None = None) -> Tensor:
        """``quantize_weight(w) - w`` in float32 (used by the ``quant_error`` noise), computed in place;
        with flat ``indices``, only those entries (flat, in their order), at the cost of the grid's min/max."""
        if indices is not None:
            return rtn_error_at(weight, indices, self.bits, self.group_size, self.sym)
        return rtn_error(weight, self.bits, self.group_size, self.sym)


def default_name(family: str, bits: int, group_size: int | None, sym: bool = False) -> str:
    """``rtn4``, ``rtn3_g32``, ``rtn4_sym_g32`` ..."""
    name = f"{family}{bits}"
    if sym:
        name += "_sym"
    if group_size is not None:
        name += f"_g{group_size}"
    return name


def rtn_fields(weight: Tensor, bits: int, group_size: int | None = None, sym: bool = False) -> dict[str, Tensor]:
    """The stored form of an RTN-grid weight (RTN, cube-root, GPTQ)."""
    codes, scale, zero = rtn_encode(weight, bits, group_size, sym)
    return {"codes": codes, "scale": scale, "zero": zero}


def decode_rtn_fields(payload: Mapping[str, Tensor], group_size: int | None) -> Tensor:
    """Float32 weight ``scale · (codes - zero)`` (the same ops as :func:`~npft_lightning.quant.rtn.rtn_quantize`)."""
    return rtn_decode(payload["codes"], payload["scale"], payload["zero"], group_size)
