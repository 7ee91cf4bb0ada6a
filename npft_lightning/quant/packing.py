"""Stored forms of quantized fields: bit packing of integer codes, the smallest lossless dtype of every
other field, and the bits per weight that storage costs (what :mod:`~npft_lightning.quant.artefact` writes)."""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

_PACK_CHUNK = 1 << 20  # groups of 8 codes per step: bounds the int64 temporaries to 64 MiB


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits: ``ceil(numel · bits / 8)``."""
    return -(-numel * bits // 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2^bits) densely into a 1-D uint8 tensor of :func:`packed_numel` bytes.

    Layout: the flattened codes, zero-padded to a multiple of 8, in groups of 8; code ``i`` of a
    group sits in bits ``[i·bits, (i+1)·bits)`` of a little-endian ``8·bits``-bit word, stored as
    ``bits`` bytes, least significant first (3-bit: 8 codes in 3 bytes). Bytes holding only
    padding are dropped, so the whole buffer is the little-endian bit stream of the codes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code is {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    groups = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    code_shift = torch.arange(8, device=flat.device) * bits
    byte_shift = torch.arange(bits, device=flat.device) * 8
    out = []
    for part in groups.split(_PACK_CHUNK):
        # The codes occupy disjoint bits of the (at most 56-bit) word, so their sum is their OR.
        words = (part.long() << code_shift).sum(dim=1)
        out.append(((words[:, None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1))
    return (torch.cat(out) if out else flat.new_zeros(0))[: packed_numel(flat.numel(), bits)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes (1-D uint8) of a :func:`pack_bits` buffer."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_numel(numel, bits):
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {packed_numel(numel, bits)} bytes for {numel} "
            f"{bits}-bit codes, got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    code_shift = torch.arange(8, device=packed.device) * bits
    byte_shift = torch.arange(bits, device=packed.device) * 8
    padded = torch.cat([packed, packed.new_zeros(-(-numel // 8) * bits - packed.numel())])
    out = []
    for part in padded.reshape(-1, bits).split(_PACK_CHUNK):
        words = (part.long() << byte_shift).sum(dim=1)
        out.append(((words[:, None] >> code_shift) & (2**bits - 1)).to(torch.uint8).reshape(-1))
    return (torch.cat(out) if out else packed.new_zeros(0))[:numel]


STORED_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32)}


SAFETENSORS_DTYPES = {"U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
                       "BF16": torch.bfloat16, "F32": torch.float32}


def same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (so -0.0 != 0.0 and a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(int_view(a.dtype)), b.view(int_view(b.dtype)))


def int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def stored_form(t: Tensor, bits: int) -> tuple[Tensor, dict[str, Any]]:
    """The smallest lossless stored form of ``t`` and what :func:`from_stored_form` needs to undo it."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in STORED_DTYPES.values():
        raise TypeError(f"cannot store a {t.dtype} field; use uint8 codes, int64 indices or float32 values")
    meta: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.dtype in (torch.uint8, torch.float32) and t.numel():
        codes = t.nan_to_num(0).clamp(0, 255).to(torch.uint8)  # only kept if it gives t back bit for bit
        if int(codes.max()) < 2**bits and same_bits(codes.to(t.dtype), t):
            return pack_bits(codes, bits), {**meta, "bits": bits}
    if t.dtype == torch.float32:
        for half in (torch.float16, torch.bfloat16):
            if same_bits(t.to(half).float(), t):
                return t.to(half), meta
    if t.dtype == torch.int64 and (t.numel() == 0 or (int(t.min()) >= -(2**31) and int(t.max()) < 2**31)):
        return t.to(torch.int32), meta
    return t, meta


def from_stored_form(stored: Tensor, meta: Mapping[str, Any], key: str) -> Tensor:
    """Undo :func:`stored_form` (raises ValueError naming ``key`` if the stored tensor does not fit ``meta``)."""
    shape, dtype = list(meta["shape"]), STORED_DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {key}: unknown dtype {meta['dtype']!r}")
    numel = math.prod(shape)
    if "bits" in meta:
        stored = unpack_bits(stored, int(meta["bits"]), numel)
    if stored.numel() != numel:
        raise ValueError(f"tensor {key} has {stored.numel()} values, the config says shape {shape}")
    return stored.reshape(shape).to(dtype)


def code_bits(quantizer: Any, name: str | None = None) -> int:
    """The bit width of the quantizer's codes (a wrapper's base quantizer's); with ``name``, of that linear's codes
    where they differ per tensor (a llama.cpp file type's tensors are of several ggml types: ``code_bits_of``)."""
    per_tensor = getattr(quantizer, "code_bits_of", None)
    if name is not None and per_tensor is not None:
        return per_tensor(name)
    if isinstance(getattr(quantizer, "bits", None), int):
        return quantizer.bits
    if getattr(quantizer, "base", None) is not None:  # a wrapper (dense-and-sparse, ReQuant): its base's codes
        return code_bits(quantizer.base, name)
    raise ValueError(f"{type(quantizer).__name__} has no integer `bits` attribute; cannot pack its codes")


def tally_bytes(stored: list[tuple[str, int, torch.dtype]]) -> tuple[int, int, int, int, int]:
    """Bytes of (codes, metadata, sparse part, float32 metadata, float32 sparse values) from
    (field name, stored bytes, stored dtype) of every stored field."""
    codes = meta = sparse = meta_fp32 = sparse_fp32 = 0
    for field, nbytes, dtype in stored:
        if field == "codes":
            codes += nbytes
        elif field.startswith("sparse_"):
            sparse += nbytes
            sparse_fp32 += nbytes if dtype == torch.float32 else 0
        else:
            meta += nbytes
            meta_fp32 += nbytes if dtype == torch.float32 else 0
    return codes, meta, sparse, meta_fp32, sparse_fp32


def encoding_size(fields: Mapping[str, Mapping[str, Tensor]], bits: int | Callable[[str], int],
                  n_weights: int) -> dict[str, float | int]:
    """Effective bits per weight of encoded linears (canonical name -> the fields ``encode_model`` returns).

    ``bits``: the width codes are packed at, or a function of the linear's name giving it (:func:`code_bits`).

    Each field is counted in the form :func:`save_quantized` stores it (bit-packed codes, float32 or exact
    half-precision floats, int32 positions), so ``bits_per_weight`` equals the artefact's
    ``linear_bits_per_weight``: dense codes + scales / zero points / tables + sparse values and positions,
    over the ``n_weights`` weights of these linears. ``bits_per_weight_16bit_floats`` counts every float32
    field (scales, tables, sparse values) at 2 bytes, as papers usually count fp16 scales and values.
    """
    stored = []
    for name, payload in fields.items():
        width = bits(name) if callable(bits) else bits
        for field, value in payload.items():
            t, _ = stored_form(value, width)
            stored.append((field, t.numel() * t.element_size(), t.dtype))
    codes, meta, sparse, meta_fp32, sparse_fp32 = tally_bytes(stored)
    total = codes + meta + sparse
    entries = sum(int(p["sparse_index"].numel()) for p in fields.values() if "sparse_index" in p)
    return {
        "codes_bytes": codes, "meta_bytes": meta, "sparse_bytes": sparse, "linear_bytes": total,
        "linear_weights": n_weights, "sparse_entries": entries,
        "sparse_percent": 100 * entries / n_weights if n_weights else 0.0,
        "bits_per_weight": 8 * total / n_weights if n_weights else 0.0,
        "bits_per_weight_16bit_floats": 8 * (total - (meta_fp32 + sparse_fp32) // 2) / n_weights if n_weights else 0.0,
    }


def gguf_linear_size(fields: Mapping[str, Mapping[str, Tensor]], shapes: Mapping[str, tuple[int, int]],
                     quantizer: Any) -> dict[str, float | int] | None:
    """Bytes and bits per weight of the decoder linears in the GGUF file ``gguf_out=`` writes of ``fields``
    (canonical name -> encoded fields; each tensor's ggml type: its ``ggml_type`` field, else the quantizer's one
    ``qtype``), by llama.cpp's block sizes; None for a quantizer without a ggml layout."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if not callable(getattr(quantizer, "gguf_tensor", None)):  # gguf_export.writes_gguf
        return None
    total = weights = 0
    for name, payload in fields.items():
        if "ggml_type" in payload:
            ggml_type = GGMLQuantizationType(int(payload["ggml_type"][0]))
        elif isinstance(getattr(quantizer, "qtype", None), str):
            ggml_type = GGMLQuantizationType[quantizer.qtype.upper()]
        else:
            return None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        rows, cols = shapes[name]
        if cols % block:
            return None  # no GGUF of this type holds the tensor (the export says so)
        total += rows * (cols // block) * block_bytes
        weights += rows * cols
    return {"gguf_linear_bytes": total, "gguf_bits_per_weight": 8 * total / weights if weights else 0.0}
