"""A llama.cpp file type (``Q4_K_M``, ``IQ4_XS``, ``Q4_0`` ...) as a quantizer: each tensor in the type
llama.cpp's quantizer would give it.

The type of each tensor comes from llama.cpp's rules (:func:`~npft_lightning.quant.llamacpp_rules.tensor_types`:
more bits for some tensors, fallbacks for rows that do not fill whole blocks); :class:`LlamaCppFileType`
applies that plan with the bit-exact twins of each ggml type (:mod:`~npft_lightning.quant.ggml`,
:mod:`~npft_lightning.quant.kquants`, :mod:`~npft_lightning.quant.iq4`), so that a recipe can train for the
file a user will write, and ``gguf_out`` can write that file.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import block_index
from npft_lightning.quant import llamacpp_rules
from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.ggml_base import GGMLTypeQuantizer
from npft_lightning.quant.importance import ImportanceLookup, gguf_weight_name
from npft_lightning.quant.iq4 import IQ4Quantizer
from npft_lightning.quant.kquants import KQuantizer
from npft_lightning.quant.llamacpp_rules import (
    FALLBACK,
    UNQUANTIZED,
    ModelShape,
    Tensor2D,
    linear_types,
    tensor_types,
)

# ggml type -> the class of its bit-exact twin.
TWINS: dict[str, type[GGMLTypeQuantizer]] = {qtype: cls for cls in (GGMLQuantizer, KQuantizer, IQ4Quantizer)
                                             for qtype in cls.family.formats}
# The file types whose every tensor type (and its fallback) has a twin: all llama.cpp writes without an imatrix but Q2_K.
FILE_TYPES = tuple(name for name in llamacpp_rules.FILE_TYPES
                   if all(t in TWINS and FALLBACK.get(t, t) in TWINS for t in linear_types(name)))


def check_file_type(file_type: str) -> str:
    key = str(file_type).upper()
    if key not in FILE_TYPES:
        raise UserError(f"llama.cpp file type {file_type!r} has no fake-quant twin here; use one of {', '.join(FILE_TYPES)}")
    return key


def llama_model_shape(linears: Mapping[str, nn.Linear]) -> ModelShape:
    """The :class:`ModelShape` of a llama or Gemma 3 model from its decoder linears (canonical names; llama.cpp's rules
    have no gemma3 case, and its files of tiny Gemma 3 models follow the same plan: tests/test_llamacpp_filetype.py)."""
    for name in linears:
        try:
            gguf_weight_name(name)
        except ValueError:
            raise UserError(f"a llama.cpp file type plans the tensors of a llama or gemma3 model, but the layer {name} "
                            f"has no llama GGUF name; use a single ggml type (e.g. quant=q4_0) for this model") from None
    n_layer = 1 + max(block_index(name) for name in linears)
    q = next((l for n, l in linears.items() if n.endswith("q_proj")), None)
    k = next((l for n, l in linears.items() if n.endswith("k_proj")), None)
    if q is None or k is None:
        raise UserError("a llama.cpp file type needs a llama model (q_proj / k_proj attention); this model has neither")
    n_gqa = q.out_features // k.out_features  # n_head / n_head_kv: the heads share one size
    return ModelShape(n_layer=n_layer, n_gqa=n_gqa, is_70b=n_layer == 80 and n_gqa > 1)


def twin(ggml_type: str) -> GGMLTypeQuantizer | None:
    """The bit-exact quantizer of one ggml type; None for ``f16`` (a float16 copy)."""
    if ggml_type == UNQUANTIZED:
        return None
    if ggml_type not in TWINS:
        raise ValueError(f"no twin for ggml type {ggml_type}")
    return TWINS[ggml_type](ggml_type)


def ggml_bytes(fields: Mapping[str, Tensor], ggml_type: str) -> np.ndarray:
    """The bytes a GGUF file stores for a twin's encoded fields (uint8 [rows, row_size]), any type but ``f16``."""
    quantizer = twin(ggml_type)
    if quantizer is None:
        raise ValueError(f"no block layout for ggml type {ggml_type}")
    return quantizer.ggml_bytes(fields)


class LlamaCppFileType(ImportanceLookup, WeightQuantizer):
    """The tensors of a llama.cpp file type, each in the ggml type ``llama_model_quantize`` gives it.

    ``file_type``: one of :data:`FILE_TYPES` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K,
    IQ4_NL, IQ4_XS).
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

    def code_bits_of(self, name: str) -> int:
        """The width of the linear ``name``'s codes: its planned type's (the artefact packs each tensor at its own)."""
        quantizer = twin(self.type_of(name))
        return self.bits if quantizer is None else quantizer.bits

    def type_of(self, name: str | None) -> str:
        if name is None or name not in self._types:
            raise UserError(f"quant {self.name}: llama.cpp picks a type per tensor from the whole model, but "
                            f"{name or 'an unnamed weight'} is not in the plan; bind(linears) first (the fake-quant "
                            f"validation and quant_error noise do) and give each weight its layer name")
        return self._types[name]

    def _twin(self, ggml_type: str) -> GGMLTypeQuantizer | None:
        """The twin of ``ggml_type``, sharing this quantizer's importance matrix."""
        quantizer = twin(ggml_type)
        if quantizer is not None:
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

    @property
    def llama_file_type(self) -> str:
        """The file type a GGUF of this quantizer is (its ``general.file_type``)."""
        return self.file_type

    def gguf_tensor(self, weight: Tensor, *, name: str | None = None) -> tuple[np.ndarray, Any]:
        """``(data, ggml type)`` of ``weight`` in the file: the planned type's blocks, F16 where llama.cpp leaves the
        tensor unquantized; it dequantizes to :meth:`quantize_weight`, bit for bit. :meth:`bind` first."""
        from gguf import GGMLQuantizationType

        quantizer = self._twin(self.type_of(name))
        if quantizer is None:
            return weight.detach().float().cpu().half().numpy(), GGMLQuantizationType.F16
        return quantizer.gguf_tensor(weight, name=name)

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
