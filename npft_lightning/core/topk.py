"""Top-k selection with deterministic ties: the one rule every mask of the package is cut by.

Ties at the cut go to the lowest flat index (and, over several matrices, to the matrix first in name
order), because ``torch.topk`` alone does not promise which of several equal values it keeps.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor


def top_k_flat(scores: Tensor, k: int, threshold: Tensor | None = None) -> Tensor:
    """Sorted flat indices of the ``k`` largest entries; ties at the cut go to the lowest flat index.

    ``torch.topk`` alone does not promise which of several equal values it keeps, so the cut
    value v is found first, then everything strictly above v is kept and the remainder is
    filled from the entries equal to v in index order: deterministic on every backend.
    The indices are int32 whenever the matrix has fewer than 2³¹ entries (half the memory of int64,
    and every matrix of a 7B model qualifies); torch indexes with them directly.
    """
    flat = scores.reshape(-1)
    dtype = torch.int32 if flat.numel() < 2**31 else torch.int64
    if k <= 0:
        return torch.empty(0, dtype=dtype, device=flat.device)
    if k >= flat.numel():
        return torch.arange(flat.numel(), dtype=dtype, device=flat.device)
    v = torch.topk(flat, k, sorted=False).values.min() if threshold is None else threshold
    above = (flat > v).nonzero().squeeze(1)
    ties = (flat == v).nonzero().squeeze(1)[: max(k - above.numel(), 0)]
    return torch.cat([above, ties]).sort().values.to(dtype)


def largest_remainder(mass: list[float], caps: list[int], total: int) -> list[int]:
    """Integer counts proportional to ``mass``, each ≤ its cap, summing exactly to ``total``.

    Water-filling first: a matrix whose proportional share exceeds its size is filled
    completely and the rest of the budget is shared among the others. The real-valued shares
    are then floored, and the leftover units go to the largest fractional parts (ties to the
    earlier matrix). All-zero mass falls back to shares proportional to size.
    """
    n = len(mass)
    share = [0.0] * n
    free = [i for i in range(n) if caps[i] > 0]
    budget = float(total)
    while free:
        weights = [mass[i] for i in free]
        if sum(weights) <= 0:
            weights = [float(caps[i]) for i in free]
        lam = budget / sum(weights)
        full = [i for i, w in zip(free, weights) if lam * w >= caps[i]]
        if not full:
            for i, w in zip(free, weights):
                share[i] = lam * w
            break
        for i in full:
            share[i] = float(caps[i])
            budget -= caps[i]
        free = [i for i in free if i not in set(full)]

    counts = [min(int(math.floor(s)), caps[i]) for i, s in enumerate(share)]
    left = total - sum(counts)
    order = sorted(range(n), key=lambda i: (-(share[i] - math.floor(share[i])), i))
    while left > 0:  # one pass gives each matrix at most one extra unit; loop only for float slack
        progressed = False
        for i in order:
            if left == 0:
                break
            if counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"cannot place {left} more outliers: every matrix is full")
    return counts


def _global_threshold(scores: Mapping[str, Tensor], total: int) -> Tensor:
    """The ``total``-th largest value over all matrices, keeping only ``total`` candidates in memory."""
    best: Tensor | None = None
    for s in scores.values():
        flat = s.reshape(-1).float()
        top = torch.topk(flat, min(total, flat.numel()), sorted=False).values
        pool = top if best is None else torch.cat([best.to(top.device), top])
        best = torch.topk(pool, min(total, pool.numel()), sorted=False).values
    assert best is not None
    return best.min()


def global_top_k(scores: Mapping[str, Tensor], total: int) -> dict[str, Tensor]:
    """Masks (sorted flat indices) of the ``total`` largest scores over all matrices together.

    One threshold: everything strictly above it, then ties at it in (name, index) order, so exactly
    ``total`` entries (every entry if ``total`` exceeds them).
    """
    names = sorted(scores)
    total = min(int(total), sum(scores[name].numel() for name in names))
    if total <= 0:
        return {name: top_k_flat(scores[name], 0) for name in names}
    v = _global_threshold({name: scores[name] for name in names}, total)
    masks: dict[str, Tensor] = {}
    above = {name: int((scores[name].reshape(-1).float() > v.to(scores[name].device)).sum()) for name in names}
    ties_left = total - sum(above.values())
    for name in names:
        flat = scores[name].reshape(-1).float()
        n_ties = min(ties_left, int((flat == v.to(flat.device)).sum()))
        ties_left -= n_ties
        masks[name] = top_k_flat(flat, above[name] + n_ties, threshold=v.to(flat.device))
    return masks


def top_fraction_mask(score: Tensor, keep_ratio: float) -> Tensor:
    """Boolean mask of the ``round(numel · keep_ratio / 100)`` largest entries of ``score``."""
    k = min(score.numel(), int(round(score.numel() * keep_ratio / 100)))
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[top_k_flat(score.detach().float(), k)] = True
    return mask.reshape(score.shape)


def row_top_fraction_mask(x: Tensor, ratio: float) -> Tensor:
    """Boolean mask of the ``round(cols · ratio / 100)`` largest |x| of each row (last dimension); ties to the lower column,
    as in :func:`top_k_flat` (a stable descending sort keeps equal values in index order)."""
    cols = x.shape[-1]
    k = min(cols, int(round(cols * float(ratio) / 100)))
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device)
    if k > 0:
        order = torch.sort(x.detach().abs(), dim=-1, descending=True, stable=True).indices
        mask.scatter_(-1, order[..., :k], True)
    return mask
