"""Which entries of a weight matrix are selected: sorted flat indices, a bitmap, or every entry.

A mask is one of three forms, chosen by what is smallest:

* a sorted flat index tensor (int32, int64 for matrices of 2³¹ entries or more): 4 bytes per
  selected entry, the form for sparse ratios (the NPFT default selects 0.05–0.5 %);
* a :class:`BitMask`, one bit per entry of the matrix, smaller than int32 indices once more than
  1/32 of the matrix is selected (:func:`compact` picks it);
* :class:`AllEntries`, every entry (``outliers=all``, low-rank QAT): no storage at all, and the
  noise is applied with dense operations.

``index`` turns any of them into what a flat weight is indexed with (``None`` for every entry).
Checkpoints hold masks through ``mask_state`` / ``mask_from_state``: plain tensors and numbers,
so they load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass(frozen=True)
class AllEntries:
    """Every one of the ``size`` entries of a matrix."""

    size: int

    def numel(self) -> int:
        return self.size

    def to(self, device: Any = None) -> "AllEntries":
        return self

    def cpu(self) -> "AllEntries":
        return self


@dataclass(frozen=True)
class BitMask:
    """One bit per entry of a ``size``-entry matrix, little-endian within each byte."""

    bits: Tensor  # uint8, ceil(size / 8)
    size: int
    count: int

    @staticmethod
    def from_indices(indices: Tensor, size: int) -> "BitMask":
        dense = torch.zeros(-(-size // 8) * 8, dtype=torch.bool, device=indices.device)
        dense[indices.long()] = True
        packed = (dense.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS.to(indices.device)).sum(dim=1, dtype=torch.uint8)
        return BitMask(packed, int(size), int(indices.numel()))

    def indices(self) -> Tensor:
        """Sorted flat int64 indices of the set bits."""
        unpacked = (self.bits[:, None] >> torch.arange(8, device=self.bits.device, dtype=torch.uint8)) & 1
        return unpacked.reshape(-1)[: self.size].nonzero().squeeze(1)

    def numel(self) -> int:
        return self.count

    def to(self, device: Any = None) -> "BitMask":
        return BitMask(self.bits.to(device), self.size, self.count)

    def cpu(self) -> "BitMask":
        return self.to("cpu")


Mask = Union[Tensor, BitMask, AllEntries]


def index(mask: Mask, device: Any = None) -> Tensor | None:
    """What to index a flat weight with: sorted indices on ``device``, or ``None`` for every entry."""
    if isinstance(mask, AllEntries):
        return None
    if isinstance(mask, BitMask):
        return mask.to(device).indices()
    return mask.to(device)


def values(mask: Mask, tensor: Tensor) -> Tensor:
    """The entries of ``tensor`` that ``mask`` selects, flattened (a view of all of them for ``AllEntries``)."""
    idx = index(mask, tensor.device)
    flat = tensor.reshape(-1)
    return flat if idx is None else flat[idx]


def explicit_index(mask: Mask, tensor: Tensor) -> Tensor:
    """Flat indices of ``mask`` on ``tensor``'s device, every entry spelled out for ``AllEntries``."""
    idx = index(mask, tensor.device)
    return torch.arange(tensor.numel(), device=tensor.device) if idx is None else idx


def boolean(mask: Mask, shape: Sequence[int], device: Any = None) -> Tensor:
    """A boolean tensor of ``shape``, True at the entries ``mask`` selects."""
    out = torch.zeros(math.prod(shape), dtype=torch.bool, device=device)
    idx = index(mask, out.device)
    if idx is None:
        out.fill_(True)
    else:
        out[idx.long()] = True
    return out.reshape(tuple(shape))


def count(mask: Mask) -> int:
    """Number of selected entries."""
    return int(mask.numel())


def nbytes(mask: Mask) -> int:
    """Bytes the mask holds in memory."""
    if isinstance(mask, AllEntries):
        return 0
    if isinstance(mask, BitMask):
        return mask.bits.numel()
    return mask.numel() * mask.element_size()


def compact(indices: Tensor, size: int) -> Mask:
    """The smallest form of a mask given by sorted flat ``indices`` of a ``size``-entry matrix."""
    if indices.numel() >= size:
        return AllEntries(int(size))
    if indices.numel() * indices.element_size() > -(-size // 8):
        return BitMask.from_indices(indices, size)
    return indices


def mask_state(mask: Mask) -> Tensor | dict[str, Any]:
    """A checkpoint-safe form (tensors and ints only)."""
    if isinstance(mask, AllEntries):
        return {"all": mask.size}
    if isinstance(mask, BitMask):
        return {"bits": mask.bits.cpu(), "size": mask.size, "count": mask.count}
    return mask.cpu()


def mask_from_state(state: Tensor | Mapping[str, Any]) -> Mask:
    if isinstance(state, Tensor):
        return state
    if "all" in state:
        return AllEntries(int(state["all"]))
    return BitMask(state["bits"], int(state["size"]), int(state["count"]))
