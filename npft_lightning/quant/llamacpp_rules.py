"""llama.cpp's choice of a ggml type for each tensor of a file type (``Q4_K_M``, ``IQ4_XS``, ``Q4_0`` ...).

A file type is not one grid. ``llama_model_quantize`` picks a ggml type per tensor
(``llama_tensor_get_type`` in ``src/llama-quant.cpp``, reproduced by :func:`tensor_types`): the file
type's default type, more bits for some tensors (``Q4_K_M``: ``attn_v`` and ``ffn_down`` of the layers
``use_more_bits`` picks at Q6_K), and a fallback when a row does not fill whole blocks of the chosen
type (:func:`fallback_type`: a K-quant needs ``in_features`` a multiple of 256: Q4_K -> Q5_0, Q5_K -> Q5_1,
Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0, IQ4_XS -> IQ4_NL; a 32-block type that does not fit -> F16). On
SmolLM2-135M (576 input features but for ``ffn_down``) ``Q4_K_M`` falls back for 180 of its 272 tensors.
Some choices depend on whether an importance matrix is given (``IQ4_XS`` / ``IQ4_NL`` ``ffn_down``, ``Q4_0``).

The one source of both users of these rules: the fake-quant twin of a file type
(:mod:`~npft_lightning.quant.llamacpp_filetype`) and llama.cpp's own quantizer run on our float export
(:mod:`~npft_lightning.quant.llamacpp_quantize`, its notes on fallbacks and the types it expects).
Type names are lower case, as ggml prints them (``q4_k``, ``f16``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterable

# llama_ftype_get_default_type of the file types llama.cpp quantizes without an importance matrix (the IQ1 / IQ2 /
# IQ3 ones and Q2_K_S need one: left out).
DEFAULT_TYPE = {
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q5_0": "q5_0", "Q5_1": "q5_1", "Q8_0": "q8_0", "Q2_K": "q2_k",
    "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k", "Q4_K_M": "q4_k",
    "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
}
FILE_TYPES = tuple(DEFAULT_TYPE)
# tensor_type_fallback: the type written instead where a row does not fill whole blocks of a 256-wide type.
FALLBACK = {"iq4_xs": "iq4_nl", "q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
UNQUANTIZED = "f16"  # where no fallback divides the row either
# llama_model_loader's file type of a file whose tensors are mostly of one ggml type (its guess when
# general.file_type is missing): what a file of one type says it is.
MOSTLY = {"q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q8_0": "Q8_0", "q2_k": "Q2_K",
          "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K", "iq4_nl": "IQ4_NL", "iq4_xs": "IQ4_XS"}


def llama_ftype(file_type: str) -> int:
    """llama.h's ``LLAMA_FTYPE_MOSTLY_<file_type>`` (the ``general.file_type`` of the file), from the gguf package."""
    from gguf import LlamaFileType

    return int(LlamaFileType[f"MOSTLY_{file_type.upper()}"])


def block_size(ggml_type: str) -> int:
    """Weights per block of a row (``ggml_blck_size``: 256 for K-quants and IQ4_XS, 32 for the others, 1 for F16)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[ggml_type.upper()]][0]


def fallback_type(ggml_type: str, ncols: int) -> str:
    """``tensor_type_fallback``: ``ggml_type`` where its blocks divide a row of ``ncols`` weights, else its
    fallback where that one's do, else F16."""
    if ncols % block_size(ggml_type) == 0:
        return ggml_type
    fallback = FALLBACK.get(ggml_type, UNQUANTIZED)
    return fallback if ncols % block_size(fallback) == 0 else UNQUANTIZED


@dataclass(frozen=True)
class ModelShape:
    """What ``llama_tensor_get_type`` reads of the model: layers, grouped-query ratio (``n_head / n_head_kv``),
    experts, and whether it is a 70B llama (80 layers with grouped-query attention)."""

    n_layer: int
    n_gqa: int
    n_expert: int = 0
    is_70b: bool = False


@dataclass(frozen=True)
class Tensor2D:
    """A tensor as the plan sees it: GGUF name, row length (``ne[0]``, the input features) and number of dims."""

    name: str
    ncols: int
    n_dims: int = 2


def _known(file_type: str) -> str:
    key = str(file_type).upper()
    if key not in DEFAULT_TYPE:
        raise ValueError(f"{file_type!r} is not a llama.cpp file type; one of {', '.join(FILE_TYPES)}")
    return key


def _category(name: str) -> str:
    """``tensor_get_category``."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, category in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                          ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                          ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return category
    return "other"


def _allows_quantization(t: Tensor2D) -> bool:
    """``tensor_allows_quantization`` for a llama model (default parameters: the output tensor is quantized)."""
    return t.n_dims >= 2 and t.name.endswith("weight") and "_norm.weight" not in t.name and "ffn_gate_inp.weight" not in t.name


def _layer_order(name: str) -> tuple[int, str]:
    """llama.cpp's tensor order (``weight_name_comparer``): by block number (-1 outside blocks), then by name."""
    layer = -1
    if name.startswith("blk."):
        try:
            layer = int(name.split(".")[1])
        except ValueError:
            pass
    return layer, name


def tensor_types(file_type: str, tensors: Iterable[Tensor2D], shape: ModelShape, has_imatrix: bool = False) -> dict[str, str]:
    """GGUF name -> the ggml type (``q4_k``, ``q6_k``, ``q5_0``, ``f16`` ...) ``llama_model_quantize`` writes for
    ``file_type``, for a llama-architecture model (``llama_tensor_get_type``, default parameters:
    no overrides, not ``pure``; tensors it leaves as they are map to ``None``)."""
    ftype = _known(file_type)
    ordered = sorted(tensors, key=lambda t: _layer_order(t.name))
    categories = {t.name: _category(t.name) for t in ordered}
    n_attention_wv = sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in categories.values())
    tied = "output" not in categories.values()
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    n = shape.n_layer

    def use_more_bits(i: int, count: int) -> bool:
        return i < count // 8 or i >= 7 * count // 8 or (i - count // 8) % 3 == 2

    out: dict[str, str] = {}
    for t in ordered:
        if not _allows_quantization(t):
            out[t.name] = None
            continue
        category = categories[t.name]
        new = DEFAULT_TYPE[ftype]
        if category == "output" or (tied and category == "token_embd"):
            if t.ncols % block_size(new):
                new = "q8_0"
            elif new != "q8_0":
                new = "q6_k"
        elif category == "token_embd":
            pass
        elif category in ("attn_v", "attn_qkv", "attn_kv_b"):
            i = counters["attn_v"]
            if ftype == "Q2_K":
                new = "q4_k" if shape.n_gqa >= 4 else "q3_k"
            elif ftype == "Q3_K_M":
                new = "q5_k" if i < 2 else "q4_k"
            elif ftype == "Q3_K_L":
                new = "q5_k"
            elif ftype in ("IQ4_NL", "IQ4_XS") and shape.n_gqa >= 4:
                new = "q5_k"
            elif ftype in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n_attention_wv):
                new = "q6_k"
            elif ftype == "Q4_K_S" and i < 4:
                new = "q5_k"
            if shape.is_70b and new in ("q3_k", "q4_k"):
                new = "q5_k"
            if shape.n_expert == 8:
                new = "q8_0"
            counters["attn_v"] += 1
        elif category == "attn_k":
            if shape.n_expert == 8:
                new = "q8_0"
        elif category == "ffn_down":
            i = counters["ffn_down"]
            if ftype == "Q2_K":
                new = "q3_k"
            elif ftype == "Q3_K_M":
                new = "q5_k" if i < n // 16 else "q4_k"
            elif ftype == "Q3_K_L":
                new = "q5_k"
            elif ftype == "Q4_K_M":
                if use_more_bits(i, n):
                    new = "q6_k"
            elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not has_imatrix:
                new = "q5_k"
            elif ftype == "Q5_K_M" and use_more_bits(i, n):
                new = "q6_k"
            elif ftype == "Q4_K_S" and i < n // 8:
                new = "q5_k"
            elif ftype in ("Q4_0", "Q5_0") and has_imatrix and i < n // 8:
                new = "q4_1" if ftype == "Q4_0" else "q5_1"
            counters["ffn_down"] += 1
        elif category == "attn_output":
            if shape.n_expert == 8:
                if ftype in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new = "q5_k"
            elif ftype == "Q2_K":
                new = "q3_k"
            elif ftype == "Q3_K_M":
                new = "q4_k"
            elif ftype == "Q3_K_L":
                new = "q5_k"
        elif category in ("ffn_gate", "ffn_up"):
            counters[category] += 1
        out[t.name] = fallback_type(new, t.ncols)
    return out


def _dense_llama(n_layer: int, width: int) -> list[Tensor2D]:
    """The decoder linears of a dense llama model whose rows fill whole blocks of every type."""
    return [Tensor2D(f"blk.{i}.{kind}.weight", width * (4 if kind == "ffn_down" else 1)) for i in range(n_layer)
            for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]


@functools.cache
def linear_types(file_type: str) -> tuple[str, ...]:
    """The ggml types ``file_type`` gives the decoder linears of a dense llama model (not the 70B) whose rows
    fill whole blocks, with or without an importance matrix, grouped-query ratio below 4 or not: its default
    type first. Read off :func:`tensor_types` (32 layers: every branch of the layer rules), so the two agree."""
    ftype = _known(file_type)
    found: set[str] = set()
    for n_gqa in (1, 4):
        for has_imatrix in (False, True):
            found.update(tensor_types(ftype, _dense_llama(32, 4096), ModelShape(32, n_gqa), has_imatrix).values())
    default = DEFAULT_TYPE[ftype]
    return (default, *sorted(found - {default}))
