"""GPTQ on a ggml type's grid: a llama.cpp file whose blocks GPTQ chose.

llama.cpp's quantizer rounds each weight to its block's grid on its own (with an importance matrix, it also
weighs the search of each block's scale). GPTQ (:mod:`npft_lightning.quant.gptq`) rounds the columns one at a
time and lets the later columns absorb each rounding error through the inverse Hessian of the layer's inputs.
Here the grid is a ggml type's: the type's own encoder (:mod:`~npft_lightning.quant.ggml`,
:mod:`~npft_lightning.quant.kquants`) sets the scales of every block up front from the weight (32 columns for the
legacy types, a 256-column super-block for the K-quants), weighted by the Hessian's diagonal (the mean squared
input of each column: llama.cpp's imatrix statistic, from the same calibration windows) unless
``weighted_scales=False``; then GPTQ picks each code, columns in act order. ``static_groups=False`` sets a
group's scales from its current, error-updated values when its first column comes up instead; with act order
that is much worse for the 256-wide K-quant groups (the layer error of tests/test_gptq_ggml.py: 3x for Q4_K). The scales
and codes are the type's fields, so the weight is the type's decode of them and the GGUF export (``gguf_out=``)
writes those very blocks: a standard file that llama.cpp (and every GGUF reader) runs, of exactly the type's size.

    python eval.py adapter=<run>/adapter quant=gptq_q4_0 gguf_out=model.gguf llamacpp_ppl=true
    python eval.py adapter=<run>/adapter quant=gptq_q4_k_m gguf_out=model.gguf llamacpp_ppl=true   # a whole Q4_K_M file

A file type (``file_type=Q4_K_M``) takes each tensor's type from llama.cpp's own rules
(:mod:`~npft_lightning.quant.llamacpp_filetype`), fallbacks for rows that do not fill a super-block included.

Types: every ggml type with a twin here. The legacy types and K-quants have codes on an affine grid per
(sub-)block (value = a·code + b, a and b read off the type's decoder); IQ4_NL / IQ4_XS have 16 non-uniform levels
per block, and each weight rounds to the nearest of its block's 16 decoded values. A K-quant or IQ4_XS needs input
features that are a multiple of 256 (a file type falls back as llama.cpp does).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml import BLOCK, GGMLQuantizer
from npft_lightning.quant.ggml import FORMATS as LEGACY
from npft_lightning.quant.ggml_base import GGMLTypeQuantizer
from npft_lightning.quant.gptq import GPTQ, gptq_codes
from npft_lightning.quant.iq4 import SUPER as IQ4_SUPER
from npft_lightning.quant.iq4 import IQ4Quantizer
from npft_lightning.quant.kquants import FORMATS as KQUANTS
from npft_lightning.quant.kquants import QK_K, KQuantizer, check_superblocks
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType
from npft_lightning.quant.llamacpp_filetype import twin as file_type_twin

TABLES = list(IQ4_SUPER)  # non-uniform levels: each weight rounds to the nearest of its 16 decoded values
TYPES = [*LEGACY, *KQUANTS, *TABLES]


def ggml_twin(qtype: str) -> GGMLTypeQuantizer:
    """The ggml type quantizer whose encoder, decoder and blocks GPTQ uses."""
    qtype = str(qtype).lower()
    if qtype in LEGACY:
        return GGMLQuantizer(qtype)
    if qtype in KQUANTS:
        return KQuantizer(qtype)
    if qtype in IQ4_SUPER:
        return IQ4Quantizer(qtype)
    raise ValueError(f"quant qtype={qtype} is not a ggml type GPTQ can round to; use one of {', '.join(TYPES)}")


def group_size_of(qtype: str) -> int:
    """The columns that share scales: a K-quant's or IQ4_XS's 256-wide super-block, else a 32-weight block."""
    return QK_K if qtype in KQUANTS else IQ4_SUPER.get(qtype, BLOCK)


class GGMLGrid:
    """A ggml type's grid for :func:`~npft_lightning.quant.gptq.gptq_codes`: each group (a block or super-block of
    columns) encoded by the type's own encoder, up front from ``weight`` (static groups) or from its current values
    when its first column comes up (``weight=None``). Per weight, the affine types' value = a·code + b, a and b read
    off the type's decoder (codes 0 and 1), so any affine code layout works; a table type (IQ4) keeps the 16 decoded
    levels of every weight and rounds to the nearest."""

    def __init__(self, twin: GGMLTypeQuantizer, group_size: int, importance: Tensor | None, weight: Tensor | None = None) -> None:
        self.twin, self.group_size, self.importance = twin, group_size, importance
        self.maxq = 2**twin.bits - 1
        self.fields: dict[int, dict[str, Tensor]] = {}
        self._affine: dict[int, tuple[Tensor, Tensor]] = {}
        self._levels: dict[int, Tensor] = {}  # a table type's [16, rows, group] levels
        self.dynamic = weight is None
        if weight is not None:  # static groups: every group's grid up front, from the original weight
            for group in range(weight.shape[1] // group_size):
                self.set_group(group, weight[:, group * group_size:(group + 1) * group_size])

    def set_group(self, group: int, current: Tensor) -> None:
        cols = slice(group * self.group_size, (group + 1) * self.group_size)
        weights = None if self.importance is None else self.importance[cols]
        fields = self.twin.family.encode(current.float(), self.twin.qtype, weights, None)
        self.fields[group] = fields

        def decoded(code: int) -> Tensor:  # every weight of the group as if its code were ``code``
            return self.twin.family.decode({**fields, "codes": torch.full_like(fields["codes"], code)}, self.twin.qtype)

        if self.twin.qtype in TABLES:  # the 16 levels of each weight, exactly as decoded
            self._levels[group] = torch.stack([decoded(c) for c in range(self.maxq + 1)])
        else:
            b = decoded(0).double()
            self._affine[group] = decoded(1).double() - b, b

    def round(self, w: Tensor, group: int, column: int) -> tuple[Tensor, Tensor]:
        if self.twin.qtype in TABLES:
            levels = self._levels[group][:, :, column].to(w.dtype)  # [16, rows]
            q = (w[None] - levels).abs().argmin(dim=0)
            return q.to(w.dtype), levels.gather(0, q[None])[0]
        a, b = (t[:, column] for t in self._affine[group])
        flat = a == 0  # an all-zero (sub-)block: every code decodes to b; keep the encoder's
        q = torch.clamp(torch.round((w - b) / torch.where(flat, torch.ones_like(a), a)), 0, self.maxq)
        q = torch.where(flat, self.fields[group]["codes"][:, column].to(q.dtype), q)
        return q, a * q + b


def gptq_ggml_fields(weight: Tensor, hessian: Tensor, twin: GGMLTypeQuantizer, act_order: bool = True, block_size: int = 128,
                     percdamp: float = 0.01, weighted_scales: bool = True, static_groups: bool = True) -> dict[str, Tensor]:
    """GPTQ of one matrix [out, in] on ``twin``'s grid: the type's fields (``twin.decode_weight`` reads them,
    ``twin.ggml_bytes`` packs them)."""
    group = group_size_of(twin.qtype)
    if weight.shape[1] % group:
        if twin.qtype in KQUANTS:
            check_superblocks(weight.shape[1], twin.qtype)
        raise UserError(f"quant gptq_{twin.qtype}: ggml blocks hold {group} weights of a row, but the {weight.shape[1]} "
                        f"input features are not a multiple of {group}; use another quantizer for this model")
    importance = None
    if weighted_scales:  # the Hessian's diagonal ∝ the mean squared input of each column (llama.cpp's imatrix)
        diag = hessian.diagonal().detach().float().to(weight.device)
        importance = diag.clamp_min(1e-12 * float(diag.max().clamp_min(1e-30)))  # a dead column weighs ~0, not 0
    codes, _, grid = gptq_codes(weight, hessian, lambda w: GGMLGrid(twin, group, importance, w if static_groups else None), group,
                                act_order, block_size, percdamp)
    parts = [grid.fields[g] for g in range(weight.shape[1] // group)]
    fields = {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}
    fields["codes"] = codes.to(fields["codes"].device)
    return fields


class GPTQGGML(GPTQ):
    """GPTQ whose grid is the ggml type ``qtype``, or, with ``file_type`` (``Q4_K_M`` ...), each decoder linear's in
    the type llama.cpp's quantizer gives it in that file (:class:`~npft_lightning.quant.llamacpp_filetype.LlamaCppFileType`'s
    plan, fallbacks included, as with ``--imatrix`` unless ``imatrix_plan=False``; an F16 tensor stays a float16 copy). See the module docstring. Fake-quant, bits per
    weight, the packed artefact and the GGUF export (``gguf_out=``: the blocks of the last calibrated pass)."""

    def __init__(self, qtype: str | None = None, file_type: str | None = None, act_order: bool = True, true_sequential: bool = True,
                 block_size: int = 128, percdamp: float = 0.01, weighted_scales: bool = True, static_groups: bool = True,
                 imatrix_plan: bool = True, name: str | None = None, batch_size: int = 8):
        if qtype is not None and file_type is not None:
            raise ValueError(f"quant qtype={qtype} and file_type={file_type}: give one (a ggml type, or a llama.cpp file type)")
        self.plan = None if file_type is None else LlamaCppFileType(file_type)
        if self.plan is not None and imatrix_plan:
            # the types llama.cpp picks when it quantizes with an importance matrix (GPTQ's Hessian diagonal is one):
            # the file then has the size of llama-quantize --imatrix's (an empty table: the plan's flag, no weights)
            self.plan.with_importance({})
        self.twin = None if self.plan is not None else ggml_twin(qtype or "q4_0")
        group = None if self.twin is None else group_size_of(self.twin.qtype)
        label = self.plan.file_type.lower() if self.plan is not None else self.twin.qtype
        super().__init__(bits=8 if self.twin is None else self.twin.bits, group_size=group, act_order=act_order,
                         true_sequential=true_sequential, block_size=block_size, percdamp=percdamp,
                         name=name or f"gptq_{label}", static_groups=static_groups, batch_size=batch_size)
        self.qtype = None if self.twin is None else self.twin.qtype
        self.weighted_scales = bool(weighted_scales)
        self.recorded: dict[str, dict[str, Tensor]] = {}  # canonical name -> fields of the last calibrated pass

    @property
    def grid_name(self) -> str:
        return self.twin.qtype if self.plan is None else f"llamacpp_{self.plan.file_type.lower()}"

    @property
    def llama_file_type(self) -> str:
        return self.plan.file_type if self.plan is not None else self.twin.llama_file_type

    def _twin_of(self, name: str | None) -> tuple[str, GGMLTypeQuantizer | None]:
        if self.plan is None:
            return self.twin.qtype, self.twin
        ggml_type = self.plan.type_of(name)
        return ggml_type, file_type_twin(ggml_type)

    def code_bits_of(self, name: str) -> int:
        """The width of the linear ``name``'s codes (a file type's tensors are of several ggml types)."""
        _, twin = self._twin_of(name)
        return self.bits if twin is None else twin.bits

    def matrix_fields(self, weight: Tensor, hessian: Tensor, keep: Tensor | None = None, name: str | None = None) -> dict[str, Tensor]:
        if keep is not None:
            raise UserError(f"quant {self.name}: a ggml file has no sparse part; use it without a dense-and-sparse wrapper")
        ggml_type, twin = self._twin_of(name)
        if twin is None:  # llama.cpp leaves the tensor in F16
            fields = {"values": weight.detach().float().half().float()}
        else:
            fields = gptq_ggml_fields(weight, hessian, twin, self.act_order, self.block_size, self.percdamp, self.weighted_scales,
                                      self.static_groups)
        if self.plan is not None:
            from gguf import GGMLQuantizationType

            fields["ggml_type"] = torch.tensor([int(GGMLQuantizationType[ggml_type.upper()])], dtype=torch.uint8)
        return fields

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        return self.twin.decode_weight(payload) if self.plan is None else self.plan.decode_weight(payload)

    def _quantize_blocks(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None,
                         record: bool) -> dict[str, dict[str, Tensor]]:
        if self.plan is not None:
            self.plan.bind(linears)
        fields = super()._quantize_blocks(model, linears, calibration, record=True)
        self.recorded = fields  # what gguf_tensor writes
        return fields if record else {}

    def gguf_tensor(self, weight: Tensor, *, name: str | None = None) -> tuple[Any, Any]:
        """``(data, ggml type)`` of the linear ``name``: the blocks GPTQ chose in the last calibrated pass."""
        from gguf import GGMLQuantizationType

        fields = self.recorded.get(name or "")
        if fields is None:
            raise UserError(f"quant {self.name}: no GPTQ pass has quantized {name}; a GGUF of {self.name} is written "
                            f"after eval.py scores it (gguf_out= with quant={self.name})")
        _, twin = self._twin_of(name)
        if tuple(fields["values" if twin is None else "codes"].shape) != tuple(weight.shape):
            raise UserError(f"quant {self.name}: {name} is {tuple(weight.shape)} but its GPTQ pass quantized another shape; "
                            f"score and export the same model")
        if twin is None:
            return fields["values"].cpu().half().numpy(), GGMLQuantizationType.F16
        return twin.ggml_bytes({k: v for k, v in fields.items() if k != "ggml_type"}), twin.ggml_type
