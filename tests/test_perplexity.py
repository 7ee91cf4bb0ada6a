"""The GPTQ perplexity protocol, checked against a direct computation."""

import math

import torch
import torch.nn.functional as F

from npft_lightning.core.perplexity import (
    causal_lm_nll,
    cut_windows,
    dataset_nll,
    perplexity,
)


def test_cut_windows_drops_the_tail():
    w = cut_windows(torch.arange(10), 4)
    assert w.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_nll_matches_mean_window_loss(tiny_llama, token_windows):
    nll, n = dataset_nll(tiny_llama, [token_windows[:2], token_windows[2:]])
    losses = [tiny_llama(input_ids=w[None], labels=w[None]).loss.item() for w in token_windows]
    assert n == token_windows.numel() - token_windows.size(0)
    # Equal-length windows: exp(total NLL / tokens) == exp(mean of window losses).
    assert math.isclose(perplexity(nll, n), math.exp(sum(losses) / len(losses)), rel_tol=1e-5)


def test_padding_is_not_counted():
    logits = torch.randn(1, 4, 5)
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    nll, n = causal_lm_nll(logits, ids, mask)
    expected = F.cross_entropy(logits[0, :2], ids[0, 1:3], reduction="sum")
    assert int(n) == 2 and torch.isclose(nll.float(), expected)


def test_perplexity_of_nothing_is_nan():
    assert math.isnan(perplexity(0.0, 0))
