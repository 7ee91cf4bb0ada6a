"""Sensitivity scores (Fisher, magnitude, PQI) and outlier selection."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import QuadraticModel, fill_lora_b, make_tiny_llama
from peft import LoraConfig, get_peft_model
from torch import nn

from npft_lightning.core.gradients import (
    causal_lm_loss,
    fisher_diagonal,
    gradient_moments,
    taylor_loss_change,
)
from npft_lightning.core.layers import canonical_name, decoder_linears
from npft_lightning.npft.outliers import (
    OutlierSelector,
    magnitude_scores,
    mask_bytes,
    pqi_scores,
    select_outliers,
)
from npft_lightning.quant import RTN


def _lora_model(seed: int = 0) -> nn.Module:
    """Tiny llama with LoRA on q/v whose B is non-zero, so the merged weight differs from the base."""
    model = get_peft_model(make_tiny_llama(seed), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    return fill_lora_b(model, std=0.2, seed=1)


def _lora_deltas(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        canonical_name(name): module.get_delta_weight("default").detach()
        for name, module in model.named_modules()
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")
    }


def _reference_fisher(model, linears, windows):
    weights = {n: lin.weight for n, lin in linears.items()}
    ref = {n: torch.zeros_like(w) for n, w in weights.items()}
    for x in windows:
        loss = model(input_ids=x[None], labels=x[None]).loss
        grads = torch.autograd.grad(loss, list(weights.values()))
        for n, g in zip(weights, grads):
            ref[n] += g.square()
    return ref


# ------------------------------------------------------------------ Fisher


def test_fisher_matches_plain_autograd(tiny_llama, token_windows):
    linears = decoder_linears(tiny_llama)
    fisher = fisher_diagonal(tiny_llama, linears, token_windows, progress=False)
    ref = _reference_fisher(tiny_llama, linears, token_windows)
    assert fisher.keys() == linears.keys() and len(fisher) == 14
    for name in ref:
        assert fisher[name].dtype == torch.float32
        torch.testing.assert_close(fisher[name], ref[name], rtol=1e-5, atol=1e-12)
    # state left alone: everything still trainable, no stray gradients
    assert all(p.requires_grad and p.grad is None for p in tiny_llama.parameters())


def test_fisher_batched_squares_batch_mean_gradient(tiny_llama, token_windows):
    linears = decoder_linears(tiny_llama)
    fisher = fisher_diagonal(tiny_llama, linears, token_windows, batch_size=2, progress=False)
    name = "model.layers.1.mlp.down_proj"
    w = linears[name].weight
    ref = sum(
        torch.autograd.grad(tiny_llama(input_ids=x, labels=x).loss, w)[0].square() for x in token_windows.split(2)
    )
    torch.testing.assert_close(fisher[name], ref, rtol=1e-5, atol=1e-12)


def test_fisher_keeps_existing_grads_and_flags(tiny_llama, token_windows):
    linears = decoder_linears(tiny_llama)
    w = linears["model.layers.0.self_attn.q_proj"].weight
    w.grad = torch.full_like(w, 3.0)
    emb = tiny_llama.model.embed_tokens.weight
    emb.requires_grad_(False)
    tiny_llama.train()
    fisher_diagonal(tiny_llama, linears, token_windows[:2], progress=False)
    assert torch.equal(w.grad, torch.full_like(w, 3.0))
    assert not emb.requires_grad and emb.grad is None
    assert tiny_llama.training and all(m.training for m in tiny_llama.modules())


def test_fisher_of_lora_model_is_fisher_of_merged_model(token_windows):
    model = _lora_model()
    model.train()  # the pass must switch LoRA dropout off, then give the mode back
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    linears = decoder_linears(model)
    assert len(linears) == 14
    fisher = fisher_diagonal(model, linears, token_windows, progress=False)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())

    merged = copy.deepcopy(model).merge_and_unload().eval()
    merged_fisher = fisher_diagonal(merged, decoder_linears(merged), token_windows, progress=False)
    assert merged_fisher.keys() == fisher.keys()
    for name in fisher:
        torch.testing.assert_close(fisher[name], merged_fisher[name], rtol=1e-5, atol=1e-12)

    # the LoRA really matters: the base model alone has a different Fisher
    plain = make_tiny_llama()
    plain_fisher = fisher_diagonal(plain, decoder_linears(plain), token_windows, progress=False)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.allclose(plain_fisher[name], fisher[name], rtol=1e-3)


def test_magnitude_scores(tiny_llama):
    linears = decoder_linears(tiny_llama)
    scores = magnitude_scores(linears)
    for name, lin in linears.items():
        assert torch.equal(scores[name], lin.weight.detach().abs())


# ------------------------------------------------------------------ PQI


@pytest.mark.parametrize("diagonal", [True, False])
def test_pqi_signed_sum_is_exact_loss_change_for_quadratic(diagonal):
    model = QuadraticModel.random(diagonal)
    linears = decoder_linears(model)
    weight = linears["layers.0"].weight
    w0 = weight.detach().clone()
    quant = RTN(bits=3)
    windows = torch.zeros(2, 4, dtype=torch.long)  # two windows: gradients are summed over them

    signed = pqi_scores(model, linears, quant, windows, intervals=3, signed=True, progress=False)["layers.0"]
    assert torch.equal(weight, w0)  # bit-exact restore

    with torch.no_grad():
        clean = model().loss.item()
        weight.copy_(quant.quantize_weight(w0))
        quantized = model().loss.item()
        weight.copy_(w0)
    assert math.isclose(signed.sum().item(), 2 * (quantized - clean), rel_tol=1e-5)

    unsigned = pqi_scores(model, linears, quant, windows, intervals=3, progress=False)["layers.0"]
    torch.testing.assert_close(unsigned, signed.abs())

    if diagonal:  # element-wise: e_i · n · (A_ii (w_i + e_i/2 − w*_i) + b_i), the exact integral
        e = (quant.quantize_weight(w0) - w0).reshape(-1)
        mid = w0.reshape(-1) + e / 2 - model.w_star
        expected = e * 2 * (model.A.diagonal() * mid + model.b)
        torch.testing.assert_close(signed.reshape(-1).double(), expected, rtol=1e-5, atol=1e-6)


def test_pqi_lora_deltas_equal_merged_model(token_windows):
    model = _lora_model()
    linears = decoder_linears(model)
    deltas = _lora_deltas(model)
    assert len(deltas) == 4
    originals = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    pqi = pqi_scores(model, linears, RTN(4), token_windows[:2], intervals=2, deltas=deltas, progress=False)
    assert all(torch.equal(lin.weight, originals[n]) for n, lin in linears.items())
    assert all(p.grad is None for p in model.parameters())

    merged = copy.deepcopy(model).merge_and_unload().eval()
    ref = pqi_scores(merged, decoder_linears(merged), RTN(4), token_windows[:2], intervals=2, progress=False)
    for name in ref:
        torch.testing.assert_close(pqi[name], ref[name], rtol=1e-4, atol=1e-9)


# ------------------------------------------------------------------ predicted loss change


def test_gradient_moments_are_mean_gradient_and_mean_fisher(tiny_llama, token_windows):
    linears = decoder_linears(tiny_llama)
    grad, fisher = gradient_moments(tiny_llama, linears, token_windows, progress=False)
    summed = fisher_diagonal(tiny_llama, linears, token_windows, progress=False)
    name = "model.layers.1.self_attn.o_proj"
    w = linears[name].weight
    per_window = [torch.autograd.grad(causal_lm_loss(tiny_llama, x[None]), w)[0] for x in token_windows]
    torch.testing.assert_close(grad[name], sum(per_window) / len(per_window), rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(fisher[name], summed[name] / len(token_windows), rtol=1e-5, atol=1e-12)
    # the mean-loss gradient is not zero at a random init, and F̄ ≥ ḡ² (Jensen), strictly somewhere
    assert grad[name].abs().max() > 0 and torch.all(fisher[name] >= grad[name].square() * (1 - 1e-5))
    assert (fisher[name] > grad[name].square() * 1.01).any()
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_taylor_loss_change_hand_checked():
    delta = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    fisher = torch.tensor([[2.0, 1.0], [4.0, 9.0]])
    grad = torch.tensor([[0.1, 0.3], [-1.0, 5.0]])
    curvature = 0.5 * (2 * 1 + 1 * 4 + 4 * 0.25)  # 3.5
    assert taylor_loss_change(delta, fisher) == pytest.approx(curvature)
    assert taylor_loss_change(delta, fisher, grad) == pytest.approx(curvature + 0.1 - 0.6 - 0.5)


def test_taylor_is_exact_for_diagonal_quadratic():
    model = QuadraticModel.random(diagonal=True)
    linears = decoder_linears(model)
    weight = linears["layers.0"].weight
    w0 = weight.detach().clone()
    grad, _ = gradient_moments(model, linears, torch.zeros(3, 4, dtype=torch.long), progress=False)
    delta = RTN(bits=3).quantize_weight(w0) - w0
    with torch.no_grad():
        clean = model().loss.item()
        weight.add_(delta)
        quantized = model().loss.item()
        weight.copy_(w0)
    hessian = model.A.diagonal().reshape(w0.shape)
    predicted = taylor_loss_change(delta, hessian, grad["layers.0"])
    assert predicted == pytest.approx(quantized - clean, rel=1e-6)
    # the gradient term matters away from a minimum: the curvature term alone misses it
    assert abs(taylor_loss_change(delta, hessian) - (quantized - clean)) > 1e-3


class _CoshModel(nn.Module):
    """loss = Σ cosh(a ⊙ W) / n: smooth, not quadratic; the exact loss change is known in closed form."""

    def __init__(self, w0: torch.Tensor, a: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)])
        with torch.no_grad():
            self.layers[0].weight.copy_(w0)
        self.register_buffer("a", a)

    def forward(self, input_ids=None, labels=None):
        return SimpleNamespace(loss=torch.cosh(self.a * self.layers[0].weight).sum() / self.a.numel())


def test_pqi_integral_is_exact_up_to_second_order_quadrature():
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(4, 8, generator=g, dtype=torch.float64)
    model = _CoshModel(w0, torch.rand(4, 8, generator=g, dtype=torch.float64) * 3 + 1)
    linears = decoder_linears(model)
    quant = RTN(bits=2)
    delta = quant.quantize_weight(w0) - w0
    exact = float((torch.cosh(model.a * (w0 + delta)) - torch.cosh(model.a * w0)).sum() / w0.numel())
    windows = torch.zeros(2, 4, dtype=torch.long)  # two batches: the signed sum is over both
    errors = {}
    for n in (2, 4, 8, 16):
        signed = pqi_scores(model, linears, quant, windows, intervals=n, signed=True, progress=False)["layers.0"]
        errors[n] = abs(signed.sum().item() / len(windows) - exact)
    assert errors[2] > 1e-4 * abs(exact)  # not quadratic: quadrature error is visible at first
    for n in (2, 4, 8):  # midpoint rule: error / 4 per halving of the step (O(1/N²))
        assert 3.5 < errors[n] / errors[2 * n] < 4.5
    assert errors[16] < 2e-3 * abs(exact)


def test_pqi_integral_of_one_matrix_matches_measured_change(tiny_llama, token_windows):
    # the quantity the sensitivity bench reports: quantize one matrix alone, predict by the path integral
    name = "model.layers.1.mlp.down_proj"
    lin = decoder_linears(tiny_llama)[name]
    quant = RTN(bits=3)
    signed = pqi_scores(tiny_llama, {name: lin}, quant, token_windows, intervals=8, signed=True, progress=False)[name]
    predicted = signed.sum().item() / len(token_windows)
    w0 = lin.weight.detach().clone()
    with torch.no_grad():
        clean = sum(causal_lm_loss(tiny_llama, x[None]).item() for x in token_windows) / len(token_windows)
        lin.weight.copy_(quant.quantize_weight(w0))
        quantized = sum(causal_lm_loss(tiny_llama, x[None]).item() for x in token_windows) / len(token_windows)
        lin.weight.copy_(w0)
    actual = quantized - clean
    assert abs(actual) > 1e-4
    assert predicted == pytest.approx(actual, rel=0.02, abs=2e-6)


# ------------------------------------------------------------------ selection


def test_per_matrix_top_k_hand_checked():
    s = torch.tensor([[0.1, 5.0, 3.0], [2.0, 0.5, 4.0]])
    masks = select_outliers({"a": s}, ratio=50)
    assert masks["a"].dtype == torch.int32  # 4 bytes per outlier (int64 only for matrices of >= 2**31 entries)
    assert select_outliers({"a": s}, ratio=100)["a"].dtype == torch.int32
    assert masks["a"].tolist() == [1, 2, 5]  # 5, 3, 4
    assert select_outliers({"a": s}, ratio=0.01)["a"].tolist() == [1]  # at least one
    assert select_outliers({"a": s}, ratio=100)["a"].tolist() == list(range(6))
    # ties at the cut: exactly k, lowest indices first (the reference's "strictly above" would give 0 here)
    assert select_outliers({"a": torch.ones(2, 3)}, ratio=50)["a"].tolist() == [0, 1, 2]
    s2 = torch.tensor([9.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    assert select_outliers({"a": s2}, ratio=50)["a"].tolist() == [0, 1, 2]


def test_per_matrix_matches_topk_on_random_scores():
    g = torch.Generator().manual_seed(0)
    scores = {"x": torch.rand(64, 128, generator=g), "y": torch.rand(32, 16, generator=g)}
    masks = select_outliers(scores, ratio=0.5)
    for name, s in scores.items():
        k = max(1, round(s.numel() * 0.5 / 100))
        assert masks[name].numel() == k
        assert torch.equal(masks[name], torch.topk(s.reshape(-1), k).indices.sort().values)
        assert torch.all(masks[name][1:] > masks[name][:-1])


def test_global_threshold():
    scores = {
        "b": torch.tensor([[9.0, 8.0], [0.0, 0.0]]),
        "a": torch.tensor([[10.0, 1.0], [1.0, 1.0]]),
    }
    masks = select_outliers(scores, ratio=37.5, budget="global")  # 3 of 8
    assert masks["a"].tolist() == [0] and masks["b"].tolist() == [0, 1]
    # ties at the threshold go to matrices in name order, then lowest index
    tied = {"b": torch.tensor([1.0, 1.0, 0.0, 0.0]), "a": torch.tensor([1.0, 1.0, 0.0, 0.0])}
    masks = select_outliers(tied, ratio=37.5, budget="global")
    assert masks["a"].tolist() == [0, 1] and masks["b"].tolist() == [0]
    # a matrix can get nothing
    masks = select_outliers({"a": torch.tensor([5.0, 4.0]), "b": torch.tensor([1.0, 0.0])}, ratio=50, budget="global")
    assert masks["a"].tolist() == [0, 1] and masks["b"].numel() == 0


def test_global_matches_concatenated_topk():
    g = torch.Generator().manual_seed(3)
    scores = {f"m{i}": torch.rand(16, 8 * (i + 1), generator=g) ** (i + 1) for i in range(4)}
    masks = select_outliers(scores, ratio=2.0, budget="global")
    names = sorted(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    total = round(flat.numel() * 2.0 / 100)
    assert sum(m.numel() for m in masks.values()) == total
    threshold = torch.topk(flat, total).values.min()
    for n in names:
        chosen = scores[n].reshape(-1)[masks[n]]
        assert torch.all(chosen >= threshold)
        assert int((scores[n] > threshold).sum()) <= masks[n].numel()


def test_adaptive_budget_hand_checked():
    # mass 3 : 1, total 4 of 200 -> 3 and 1, each on its matrix's top entries
    a = torch.zeros(100)
    a[[7, 8, 9]] = 1.0
    b = torch.zeros(100)
    b[42] = 1.0
    masks = select_outliers({"a": a, "b": b}, ratio=2.0, budget="adaptive")
    assert masks["a"].tolist() == [7, 8, 9] and masks["b"].tolist() == [42]

    # equal mass (100 each) in matrices of 50, 100 and 200 entries, 4 in all: shares 4/3 each, floors 1, 1, 1, the
    # remaining unit to the first name (a split by size would give 1, 1, 2 instead: x gets 4·50/350 = 0.57, rounded up)
    eq = {"z": torch.full((200,), 0.5), "y": torch.ones(100), "x": torch.full((50,), 2.0)}
    masks = select_outliers(eq, ratio=4 / 350 * 100, budget="adaptive")
    assert {n: m.tolist() for n, m in masks.items()} == {"x": [0, 1], "y": [0], "z": [0]}

    # a matrix is capped at its size, the rest of the budget goes elsewhere: total 10 of 104
    capped = {"a": torch.full((4,), 100.0), "b": torch.full((100,), 0.01)}
    counts = {n: m.numel() for n, m in select_outliers(capped, ratio=10 / 104 * 100, budget="adaptive").items()}
    assert counts == {"a": 4, "b": 6}


def test_adaptive_sums_exactly_and_is_proportional():
    g = torch.Generator().manual_seed(5)
    scores = {f"m{i:02d}": torch.rand(32, 64, generator=g) * (i + 1) ** 2 for i in range(11)}
    ratio = 0.37
    masks = select_outliers(scores, ratio=ratio, budget="adaptive")
    total = round(11 * 32 * 64 * ratio / 100)
    assert sum(m.numel() for m in masks.values()) == total
    mass = {n: s.double().sum().item() for n, s in scores.items()}
    for n, s in scores.items():
        share = total * mass[n] / sum(mass.values())
        assert abs(masks[n].numel() - share) < 1.0
        if masks[n].numel():
            assert torch.equal(masks[n], torch.topk(s.reshape(-1), masks[n].numel()).indices.sort().values)


@pytest.mark.parametrize("ratio", [0, -1, 100.5, float("nan"), float("inf")])
def test_ratio_validation(ratio):
    with pytest.raises(ValueError, match="0.05"):
        select_outliers({"a": torch.rand(4, 4)}, ratio=ratio)
    with pytest.raises(ValueError, match="ratio"):
        OutlierSelector(method="fisher", ratio=ratio)


def test_selector_validation_and_dispatch(tiny_llama, token_windows):
    with pytest.raises(ValueError, match="'hessian'.*fisher, magnitude, pqi"):
        OutlierSelector(method="hessian")
    with pytest.raises(ValueError, match="per_matrix, global, adaptive"):
        OutlierSelector(method="fisher", budget="layer")
    with pytest.raises(ValueError, match="once, epoch"):
        OutlierSelector(method="fisher", refresh="step")
    with pytest.raises(ValueError, match="pqi_intervals=0"):
        OutlierSelector(method="pqi", pqi_intervals=0)
    with pytest.raises(ValueError, match="NaN"):
        select_outliers({"a": torch.tensor([1.0, float("nan")])}, ratio=50)

    linears = decoder_linears(tiny_llama)
    mag = OutlierSelector(method="magnitude", ratio=1.0)
    assert not mag.needs_calibration
    masks = mag.select(tiny_llama, linears, None)
    for name, lin in linears.items():
        assert masks[name].numel() == round(lin.weight.numel() / 100)

    fisher = OutlierSelector(method="fisher", ratio=1.0, progress=False)
    assert fisher.needs_calibration
    expected = select_outliers(fisher_diagonal(tiny_llama, linears, token_windows, progress=False), 1.0)
    got = fisher.select(tiny_llama, linears, token_windows)
    assert all(torch.equal(got[n], expected[n]) for n in expected)

    with pytest.raises(ValueError, match="target quantizer"):
        OutlierSelector(method="pqi").scores(tiny_llama, linears, token_windows)
    pqi = OutlierSelector(method="pqi", ratio=1.0, pqi_intervals=1, target=RTN(4), progress=False)
    assert len(pqi.select(tiny_llama, linears, token_windows[:1])) == 14
    signed = pqi.scores(tiny_llama, linears, token_windows[:1], signed=True)
    unsigned = pqi.scores(tiny_llama, linears, token_windows[:1])
    name = "model.layers.0.mlp.up_proj"
    assert (signed[name] < 0).any() and torch.equal(signed[name].abs(), unsigned[name])


def test_mask_bytes():
    masks = {"a": torch.arange(3), "b": torch.arange(5)}
    assert mask_bytes(masks) == 8 * 8
