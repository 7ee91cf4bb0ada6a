"""Save values of tensors, write into the tensors, and put the saved values back bit for bit.

The saved values keep the tensor's own dtype, so the restore is exact whatever was written in
between (a quantized weight, a perturbed one, a point on a path). An index limits what is saved to
the entries that will be written: the memory of the change, not of the matrix. It is anything a
flattened tensor is indexed with: flat indices, or a boolean mask shaped like the tensor; ``None``
means every entry.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn


def saved_values(tensor: Tensor, index: Tensor | None = None) -> Tensor:
    """A copy of the entries of ``tensor`` at ``index`` (flattened), or of the whole tensor when ``index`` is None."""
    if index is None:
        return tensor.detach().clone()
    return tensor.detach().reshape(-1)[index.reshape(-1)]  # advanced indexing copies


@torch.no_grad()
def put_back(tensor: Tensor, values: Tensor, index: Tensor | None = None) -> None:
    """Write ``values`` from :func:`saved_values` (same ``index``) back into ``tensor``, in place."""
    if index is None:
        tensor.copy_(values)
    else:
        tensor.view(-1)[index.reshape(-1)] = values


@contextmanager
def values_restored(tensors: Mapping[str, Tensor], index: Mapping[str, Tensor | None] | None = None) -> Iterator[dict[str, Tensor]]:
    """Within the block the caller may write into ``tensors``; on exit they hold their values of the
    start again, bit for bit. Yields the saved values (name -> :func:`saved_values`), which the caller
    may read (not write) as the originals.

    ``index``: name -> what to save of that tensor (every entry for a name without one).
    """
    index = index or {}
    saved = {name: saved_values(t, index.get(name)) for name, t in tensors.items()}
    try:
        yield saved
    finally:
        for name, t in tensors.items():
            put_back(t, saved[name], index.get(name))


def weights_restored(linears: Mapping[str, nn.Linear]) -> AbstractContextManager[dict[str, Tensor]]:
    """:func:`values_restored` on the weights of ``linears``: yields a copy of each whole weight."""
    return values_restored({name: linear.weight for name, linear in linears.items()})
