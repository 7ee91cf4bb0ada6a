"""Perplexity by the GPTQ protocol: non-overlapping windows, tail dropped, PPL = exp(total NLL / tokens).

Every window has the same length, so exp(mean window loss) equals exp(summed NLL / summed count).
The functions return sums (not means) so callers can add them across batches and DDP ranks.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from npft_lightning.core.interrupt import check as stop_if_interrupted


def cut_windows(token_ids: Tensor, seq_len: int) -> Tensor:
    """A 1-D token stream -> [n_windows, seq_len], non-overlapping, the tail dropped."""
    n = token_ids.numel() // seq_len
    return token_ids[: n * seq_len].reshape(n, seq_len)


def causal_lm_nll(logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Summed next-token NLL (float64 scalar) and the number of predicted tokens.

    Position t predicts token t+1; positions whose target is padding (mask 0) do not count.
    """
    shift_logits = logits[:, :-1, :].float()
    targets = input_ids[:, 1:]
    if attention_mask is not None:
        targets = targets.masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum")
    count = (targets != -100).sum()
    return nll.double(), count


@torch.no_grad()
def dataset_nll(model: nn.Module, batches: Iterable[Tensor], device: torch.device | str | None = None) -> tuple[float, int]:
    """Summed NLL and token count of ``model`` over batches of windows [B, seq_len]."""
    total, count = 0.0, 0
    for input_ids in batches:
        stop_if_interrupted()
        if device is not None:
            input_ids = input_ids.to(device)
        logits = model(input_ids=input_ids).logits
        nll, n = causal_lm_nll(logits, input_ids)
        total += nll.item()
        count += int(n)
    return total, count


def perplexity(nll_sum: float, count: int) -> float:
    """exp(summed NLL / token count); NaN when nothing was counted."""
    if count == 0:
        return float("nan")
    return math.exp(nll_sum / count)
