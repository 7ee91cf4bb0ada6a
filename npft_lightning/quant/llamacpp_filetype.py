"""A llama.cpp file type (``Q4_K_M``, ``IQ4_XS``, ``Q4_0`` ...) as a quantizer: each tensor in the type
llama.cpp's quantizer would give it.

A file type is not one grid. ``llama_model_quantize`` picks a ggml type per tensor
(``llama_tensor_get_type`` in ``src/llama-quant.cpp``, reproduced by :func:`tensor_types`): the file
type's default type, more bits for some tensors (``Q4_K_M``: ``attn_v`` and ``ffn_down`` of the layers
``use_more_bits`` picks at Q6_K), and a fallback when a row does not fill whole blocks of the chosen
type (a K-quant needs ``in_features`` a multiple of 256: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
Q3_K -> Q4_0, IQ4_XS -> IQ4_NL; a 32-block type that does not fit -> F16). On SmolLM2-135M (576
input features but for ``ffn_down``) ``Q4_K_M`` falls back for 180 of its 272 tensors. Some choices
depend on whether an importance matrix is given (``IQ4_XS`` / ``IQ4_NL`` ``ffn_down``, ``Q4_0``).

:class:`LlamaCppFileType` applies that plan with the bit-exact twins of each ggml type
(:mod:`~npft_lightning.quant.ggml`, :mod:`~npft_lightning.quant.kquants`, :mod:`~npft_lightning.quant.iq4`),
so that a recipe can train for the file a user will write.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import block_index
from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.ggml import FORMATS as LEGACY, GGMLQuantizer, ggml_blocks
from npft_lightning.quant.importance import ImportanceLookup, gguf_weight_name
from npft_lightning.quant.iq4 import SUPER as IQ4, IQ4Quantizer, iq4_blocks
from npft_lightning.quant.kquants import FORMATS as KQUANTS, KQuantizer, kquant_blocks

# llama_ftype values (include/llama.h) of the file types whose every tensor type has a twin here.
FILE_TYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "IQ4_NL": 25, "IQ4_XS": 30,
}
DEFAULT_TYPE = {  # llama_ftype_get_default_type
    "Q4_0": "q4_0", "Q4_1": "q4_1", "Q8_0": "q8_0", "Q5_0": "q5_0", "Q5_1": "q5_1",
    "Q3_K_S": "q3_k", "Q3_K_M": "q3_k", "Q3_K_L": "q3_k", "Q4_K_S": "q4_k", "Q4_K_M": "q4_k",
    "Q5_K_S": "q5_k", "Q5_K_M": "q5_k", "Q6_K": "q6_k", "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs",
}
FALLBACK = {"iq4_xs": "iq4_nl", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}  # tensor_type_fallback


def block_size(ggml_type: str) -> int:
    """Weights per block of a row (``ggml_blck_size``)."""
    if ggml_type in KQUANTS or ggml_type == "iq4_xs":
        return 256
    return 1 if ggml_type in ("f16", "f32") else 32


def check_file_type(file_type: str) -> str:
    key = str(file_type).upper()
    if key not in FILE_TYPES:
        raise UserError(f"llama.cpp file type {file_type!r} has no fake-quant twin here; use one of {', '.join(FILE_TYPES)}")
    return key


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
    ftype = check_file_type(file_type)
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
            if ftype == "Q3_K_M":
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
            if ftype == "Q3_K_M":
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
                if ftype in ("Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"):
                    new = "q5_k"
            elif ftype == "Q3_K_M":
                new = "q4_k"
            elif ftype == "Q3_K_L":
                new = "q5_k"
        elif category in ("ffn_gate", "ffn_up"):
            counters[category] += 1
        if t.ncols % block_size(new):  # tensor_type_fallback
            new = FALLBACK.get(new, new)
            if t.ncols % block_size(new):
                new = "f16"
        out[t.name] = new
    return out


def llama_model_shape(linears: Mapping[str, nn.Linear]) -> ModelShape:
    """The :class:`ModelShape` of a llama model from its decoder linears (canonical names)."""
    for name in linears:
        try:
            gguf_weight_name(name)
        except ValueError:
            raise UserError(f"a llama.cpp file type plans the tensors of a llama-architecture model, but the layer {name} "
                            f"has no llama GGUF name; use a single ggml type (e.g. quant=q4_0) for this model") from None
    n_layer = 1 + max(block_index(name) for name in linears)
    q = next((l for n, l in linears.items() if n.endswith("q_proj")), None)
    k = next((l for n, l in linears.items() if n.endswith("k_proj")), None)
    if q is None or k is None:
        raise UserError("a llama.cpp file type needs a llama model (q_proj / k_proj attention); this model has neither")
    n_gqa = q.out_features // k.out_features  # n_head / n_head_kv: the heads share one size
    return ModelShape(n_layer=n_layer, n_gqa=n_gqa, is_70b=n_layer == 80 and n_gqa > 1)


def twin(ggml_type: str) -> WeightQuantizer | None:
    """The bit-exact quantizer of one ggml type; None for ``f16`` (a float16 copy)."""
    if ggml_type in LEGACY:
        return GGMLQuantizer(ggml_type)
    if ggml_type in KQUANTS:
        return KQuantizer(ggml_type)
    if ggml_type in IQ4:
        return IQ4Quantizer(ggml_type)
    if ggml_type == "f16":
        return None
    raise ValueError(f"no twin for ggml type {ggml_type}")


def ggml_bytes(fields: Mapping[str, Tensor], ggml_type: str):
    """The bytes a GGUF file stores for a twin's encoded fields (uint8 [rows, row_size]), any type but ``f16``."""
    if ggml_type in LEGACY:
        return ggml_blocks(fields, ggml_type)
    if ggml_type in KQUANTS:
        return kquant_blocks(fields, ggml_type)
    if ggml_type in IQ4:
        return iq4_blocks(fields, ggml_type)
    raise ValueError(f"no block layout for ggml type {ggml_type}")


class LlamaCppFileType(ImportanceLookup, WeightQuantizer):
    """The tensors of a llama.cpp file type, each in the ggml type ``llama_model_quantize`` gives it.

    ``file_type``: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, IQ4_NL, IQ4_XS.
    The plan needs the whole model (layer count, grouped-query ratio): :meth:`bind` computes it from
    the decoder linears (the fake-quant validation and the ``quant_error`` noise call it);
    :meth:`quantize_weight` then needs the tensor's name. With an importance matrix
    (:meth:`~npft_lightning.quant.importance.ImportanceLookup.with_importance`) both the plan and
    each tensor's quantization follow llama.cpp's ``--imatrix``. ``encode_weight`` adds a field
    ``ggml_type`` (the ``GGMLQuantizationType`` value) to the chosen type's fields.
    """

    rows_independent = True  # each row is quantized on its own (noise: only rows holding selected weights)

    bits = 8  # codes of every type fit in a byte (the artefact packs them at this width)

    def __init__(self, file_type: str = "Q4_K_M", name: str | None = None):
        self.file_type = check_file_type(file_type)
        self.name = name or f"llamacpp_{self.file_type.lower()}"
        self._types: dict[str, str] = {}
        self._bound: tuple | None = None

    def bind(self, linears: Mapping[str, nn.Linear]) -> "LlamaCppFileType":
        """Compute the type of every linear of ``linears`` (canonical name -> Linear). Returns self."""
        key = (tuple((n, tuple(l.weight.shape)) for n, l in sorted(linears.items())), self.has_importance)
        if key == self._bound:
            return self
        shape = llama_model_shape(linears)
        tensors = [Tensor2D(gguf_weight_name(n), int(l.weight.shape[1])) for n, l in linears.items()]
        plan = tensor_types(self.file_type, tensors, shape, has_imatrix=self.has_importance)
        self._types = {n: plan[gguf_weight_name(n)] for n in linears}
        self._bound = key
        return self

    @property
    def types(self) -> dict[str, str]:
        """Canonical linear name -> ggml type, after :meth:`bind`."""
        return dict(self._types)

    def type_of(self, name: str | None) -> str:
        if name is None or name not in self._types:
            raise UserError(f"quant {self.name}: llama.cpp picks a type per tensor from the whole model, but "
                            f"{name or 'an unnamed weight'} is not in the plan; bind(linears) first (the fake-quant "
                            f"validation and quant_error noise do) and give each weight its layer name")
        return self._types[name]

    def _twin(self, ggml_type: str) -> WeightQuantizer | None:
        """The twin of ``ggml_type``, sharing this quantizer's importance matrix."""
        quantizer = twin(ggml_type)
        if isinstance(quantizer, ImportanceLookup):
            quantizer._importance = self._importance  # the same table, already keyed by GGUF names
        return quantizer

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        from gguf import GGMLQuantizationType

        ggml_type = self.type_of(name)
        quantizer = self._twin(ggml_type)
        code = torch.tensor([int(GGMLQuantizationType[ggml_type.upper()])], dtype=torch.uint8)
        if quantizer is None:
            return {"values": weight.detach().float().half().float(), "ggml_type": code}
        return {**quantizer.encode_weight(weight, name=name), "ggml_type": code}

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        from gguf import GGMLQuantizationType

        ggml_type = GGMLQuantizationType(int(payload["ggml_type"][0])).name.lower()
        fields = {k: v for k, v in payload.items() if k != "ggml_type"}
        quantizer = twin(ggml_type)
        return fields["values"] if quantizer is None else quantizer.decode_weight(fields)

    def step(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """The step of the tensor's chosen type (F16: 0, nothing to round at this scale)."""
        ggml_type = self.type_of(name)
        quantizer = self._twin(ggml_type)
        if quantizer is None:
            return torch.zeros_like(weight, dtype=torch.float32)
        if not callable(getattr(quantizer, "step", None)):
            raise UserError(f"quant {self.name}: {name} is {ggml_type}, whose levels are not evenly spaced, so it has no "
                            f"step size for uniform_step noise; use noise=quant_error for this file type")
        return quantizer.step(weight, name=name)

    @torch.no_grad()
    def quantize_model(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None = None) -> None:
        self.bind(linears)
        super().quantize_model(model, linears, calibration)

    @torch.no_grad()
    def encode_model(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None = None):
        self.bind(linears)
        return super().encode_model(model, linears, calibration)
