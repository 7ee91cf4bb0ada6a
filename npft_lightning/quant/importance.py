"""The importance matrix (llama.cpp's "imatrix") as a quantizer sees it: one weight per input column of
each linear, looked up by the tensor's name.

llama.cpp keys its imatrix by GGUF tensor name (``blk.0.attn_q.weight``); the quantizers here are
called with the canonical names of the decoder linears (``model.layers.0.self_attn.q_proj``).
:class:`ImportanceLookup` accepts either key and finds the entry of a linear under both. Like
llama.cpp, a tensor without an entry is quantized without importance weights.
"""

from __future__ import annotations

import functools
from typing import Mapping

import torch
from torch import Tensor

from npft_lightning.core.layers import block_index


@functools.lru_cache(maxsize=None)
def gguf_weight_name(name: str) -> str:
    """llama.cpp's name of a llama-architecture tensor: ``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``.

    A name already in GGUF form is returned as is; one with no llama GGUF name raises ValueError.
    """
    from gguf import MODEL_ARCH, get_tensor_name_map

    if name.startswith("blk.") or name in ("token_embd.weight", "output.weight", "output_norm.weight"):
        return name
    key = name if name.endswith(".weight") else f"{name}.weight"
    try:
        n_blocks = block_index(name) + 1
    except ValueError:
        n_blocks = 1
    gguf_name = get_tensor_name_map(MODEL_ARCH.LLAMA, n_blocks).get_name(key, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ValueError(f"the tensor {name} has no llama GGUF name")
    return gguf_name


class ImportanceLookup:
    """Mixin of the quantizers that llama.cpp weights with an importance matrix (K-quants, IQ4, legacy types).

    :meth:`with_importance` sets the matrix (not a constructor argument: the quantizer's recorded
    config stays small); :meth:`importance_of` gives the entry of one tensor, or None.
    """

    _importance: dict[str, Tensor] | None = None

    def with_importance(self, importance: Mapping[str, Tensor] | None):
        """Use ``importance`` (tensor name, GGUF or canonical -> [in_features] non-negative floats); None: none. Returns self."""
        if importance is None:
            self._importance = None
            return self
        table: dict[str, Tensor] = {}
        for key, values in importance.items():
            values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"the importance matrix entry {key} holds non-finite values; recompute the imatrix")
            table[gguf_weight_name(key)] = values
        self._importance = table
        return self

    @property
    def has_importance(self) -> bool:
        return self._importance is not None

    def importance_of(self, name: str | None, columns: int) -> Tensor | None:
        """The importance of the ``columns`` input features of tensor ``name``; None without a matrix or an entry."""
        if self._importance is None or name is None:
            return None
        values = self._importance.get(gguf_weight_name(name))
        if values is None:
            return None
        if values.numel() != columns:
            raise ValueError(f"the importance matrix entry of {name} has {values.numel()} values, "
                             f"but the tensor has {columns} input features; it was computed for another model")
        return values
