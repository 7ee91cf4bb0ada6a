"""One ggml tensor type as a weight quantizer: what the legacy types, the K-quants and IQ4 have in common.

A family (:mod:`~npft_lightning.quant.ggml`, :mod:`~npft_lightning.quant.kquants`,
:mod:`~npft_lightning.quant.iq4`) is a :class:`GGMLFamily`: its table of types and its three functions, the
encoder (``f(weight, qtype, importance or None, name) -> fields``), the decoder (``f(fields, qtype) -> weight``)
and the block packer (``f(fields, qtype) -> the bytes a GGUF file stores``). Everything else (the constructor
and its check, the ``gguf`` type, the importance matrix lookup, the GGUF tensor) is :class:`GGMLTypeQuantizer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
from torch import Tensor

from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.importance import ImportanceLookup
from npft_lightning.quant.llamacpp_rules import MOSTLY


@dataclass(frozen=True)
class GGMLFamily:
    """A family of ggml types and the functions that quantize, dequantize and pack them."""

    formats: Mapping[str, Any]  # qtype -> its format (what the functions read; ``.bits`` the code width)
    default_qtype: str
    kind: str  # what the family is, for the error message: "a K-quant"
    encode: Callable[..., dict[str, Tensor]]
    decode: Callable[[Mapping[str, Tensor], str], Tensor]
    blocks: Callable[[Mapping[str, Tensor], str], np.ndarray]


class GGMLTypeQuantizer(ImportanceLookup, WeightQuantizer):
    """A ggml type (``qtype``, lower case: q4_0, q4_k, iq4_xs ...) as a weight quantizer, bit for bit llama.cpp's.

    With an importance matrix (:meth:`~npft_lightning.quant.importance.ImportanceLookup.with_importance`)
    the tensors found in it are quantized as llama.cpp's ``--imatrix`` does; the others without.
    Usable for fake-quant validation, ``eval.py``, the packed artefact, the GGUF export (``gguf_out=``,
    :meth:`gguf_tensor`) and as the target of the noise.
    """

    rows_independent = True  # each row is quantized on its own (noise: only rows holding selected weights)

    family: ClassVar[GGMLFamily]

    def __init__(self, qtype: str | None = None, name: str | None = None):
        family = self.family
        qtype = str(qtype or family.default_qtype).lower()
        if qtype not in family.formats:
            raise ValueError(f"quant qtype={qtype} is not {family.kind}; use one of {', '.join(family.formats)}")
        self.qtype = qtype
        self.name = name or qtype

    @property
    def bits(self) -> int:
        """The width of the stored codes (the artefact packs them at this width)."""
        return self.family.formats[self.qtype].bits

    @property
    def ggml_type(self):
        """The ``gguf.GGMLQuantizationType`` of this type."""
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.qtype.upper()]

    @property
    def llama_file_type(self) -> str:
        """The file type a GGUF of this one type is (its ``general.file_type``): llama.cpp's name for a file mostly
        of this type (``q4_k``: ``Q4_K_M``)."""
        return MOSTLY[self.qtype]

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        return self.family.encode(weight, self.qtype, self.importance_of(name, weight.shape[1]), name)

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return self.family.decode(payload, self.qtype)

    def ggml_bytes(self, fields: Mapping[str, Tensor]) -> np.ndarray:
        """The bytes a GGUF file stores for :meth:`encode_weight`'s fields: uint8 [rows, row size]."""
        return self.family.blocks(fields, self.qtype)

    def gguf_tensor(self, weight: Tensor, *, name: str | None = None) -> tuple[np.ndarray, Any]:
        """``(data, ggml type)`` of ``weight`` in a GGUF file: it dequantizes to :meth:`quantize_weight`, bit for bit."""
        return self.ggml_bytes(self.encode_weight(weight, name=name)), self.ggml_type
