"""Hessian-trace estimators on the outlier coordinates, checked on explicit quadratics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import QuadraticModel, make_tiny_llama
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from npft_lightning.core.curvature import (
    hessian_quadratic_form,
    hutchinson_trace,
    outlier_sigma,
    perturbation_trace_estimate,
)
from npft_lightning.core.layers import decoder_linears

ROWS, COLS = 4, 8
N = ROWS * COLS
WINDOWS = torch.zeros(2, 4, dtype=torch.long)  # the quadratic ignores its input
MASK = torch.tensor([1, 2, 5, 9, 10, 17, 20, 31])


def _true_trace(model: QuadraticModel) -> float:
    return model.A[MASK][:, MASK].trace().item()


# ------------------------------------------------------------------ Hutchinson


def test_hutchinson_exact_for_diagonal_hessian():
    model = QuadraticModel.random(diagonal=True)
    linears = decoder_linears(model)
    out = hutchinson_trace(model, linears, {"layers.0": MASK}, WINDOWS, probes=3)
    assert out["trace"] == pytest.approx(_true_trace(model), rel=1e-6)  # vᵀAv = Σ A_ii for any ±1 v
    assert out["stderr"] == pytest.approx(0.0, abs=1e-6)
    assert out["probes"] == 3
    assert linears["layers.0"].weight.requires_grad and linears["layers.0"].weight.grad is None


def test_hutchinson_converges_for_dense_hessian():
    model = QuadraticModel.random(diagonal=False)
    linears = decoder_linears(model)
    probes = 1000
    out = hutchinson_trace(model, linears, {"layers.0": MASK}, WINDOWS[:1], probes=probes, seed=1)
    A_mm = model.A[MASK][:, MASK]
    off = A_mm - torch.diag(A_mm.diagonal())
    std = math.sqrt(2 * off.square().sum().item() / probes)  # Rademacher variance: 2 Σ_{i≠j} A_ij²
    assert abs(out["trace"] - _true_trace(model)) < 4 * std
    assert out["stderr"] == pytest.approx(std, rel=0.2)
    # off the mask the Hessian is ignored: the full trace is much larger
    assert model.A.trace().item() > 2 * _true_trace(model)


def _float64_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    # HF upcasts logits to float32 inside its loss; keep float64 to the end for the finite difference
    logits = model(input_ids=batch).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))


def test_hutchinson_on_tiny_llama_matches_gradient_difference():
    # one masked coordinate: vᵀHv = H_ii exactly for v = ±1; compare with a central difference of the
    # first derivative (the loss itself is too noisy for a second difference: RMSNorm runs in float32)
    model = make_tiny_llama().double()
    linears = decoder_linears(model)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for name, i in (("model.layers.0.self_attn.q_proj", 77), ("model.layers.0.mlp.gate_proj", 123)):
        out = hutchinson_trace(model, linears, {name: torch.tensor([i])}, windows, probes=1, loss_fn=_float64_lm_loss)
        w = linears[name].weight
        h = 1e-2
        grads = []
        with sdpa_kernel([SDPBackend.MATH]):
            for shift in (h, -h):
                with torch.no_grad():
                    w.view(-1)[i] += shift
                g = sum(torch.autograd.grad(_float64_lm_loss(model, x[None]), w)[0].view(-1)[i] for x in windows) / 2
                grads.append(g.item())
                with torch.no_grad():
                    w.view(-1)[i] -= shift
        assert out["trace"] == pytest.approx((grads[0] - grads[1]) / (2 * h), rel=1e-3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ perturbation (zero-order)


def test_perturbation_estimate_is_unbiased_for_quadratic():
    model = QuadraticModel.random(diagonal=True)
    linears = decoder_linears(model)
    w0 = linears["layers.0"].weight.detach().clone()
    draws = 2000
    out = perturbation_trace_estimate(model, linears, {"layers.0": MASK}, WINDOWS[:1], sigma=1e-2, draws=draws)
    assert torch.equal(linears["layers.0"].weight, w0)  # bit-exact restore
    true = _true_trace(model)
    diag = model.A.diagonal()[MASK]
    std = math.sqrt(2 * diag.square().sum().item() / draws)  # var of δᵀAδ/σ² for Gaussian δ
    assert abs(out["trace"] - true) < 4 * std
    assert out["clean_loss"] == pytest.approx(model().loss.item())
    assert out["perturbed_loss"] > out["clean_loss"] and out["sigma"] == 1e-2

    # with antithetic pairs the estimate of a quadratic has no σ-dependent bias at all:
    # the same directions at any σ give the same number (exact in expectation)
    small = perturbation_trace_estimate(model, linears, {"layers.0": MASK}, WINDOWS[:1], sigma=1e-3, draws=20)
    large = perturbation_trace_estimate(model, linears, {"layers.0": MASK}, WINDOWS[:1], sigma=1.0, draws=20)
    assert small["trace"] == pytest.approx(large["trace"], rel=1e-6)


def test_perturbation_estimate_dense_and_one_sided():
    model = QuadraticModel.random(diagonal=False)
    linears = decoder_linears(model)
    true = _true_trace(model)
    two = perturbation_trace_estimate(model, linears, {"layers.0": MASK}, WINDOWS[:1], sigma=0.05, draws=1000, seed=3)
    assert abs(two["trace"] - true) < 4 * two["stderr"]
    assert two["stderr"] < 0.15 * true
    # without antithetic pairs the gradient term stays in: unbiased, but far noisier at small σ
    one = perturbation_trace_estimate(
        model, linears, {"layers.0": MASK}, WINDOWS[:1], sigma=0.05, draws=1000, seed=3, antithetic=False
    )
    assert abs(one["trace"] - true) < 4 * one["stderr"]
    assert one["stderr"] > 5 * two["stderr"]


def test_outlier_sigma_and_validation():
    model = QuadraticModel.random(diagonal=True)
    linears = decoder_linears(model)
    w = linears["layers.0"].weight.detach().reshape(-1)
    assert outlier_sigma(linears, {"layers.0": MASK}, c=0.5) == pytest.approx(0.5 * w[MASK].abs().mean().item())
    with pytest.raises(ValueError, match="sigma"):
        perturbation_trace_estimate(model, linears, {"layers.0": MASK}, WINDOWS, sigma=0.0)
    with pytest.raises(ValueError, match="probes"):
        hutchinson_trace(model, linears, {"layers.0": MASK}, WINDOWS, probes=0)
    with pytest.raises(ValueError, match="no weights"):
        hutchinson_trace(model, linears, {"layers.0": torch.empty(0, dtype=torch.long)}, WINDOWS)


# ------------------------------------------------------------------ quadratic form along a direction


def test_hessian_quadratic_form_exact_for_dense_quadratic():
    model = QuadraticModel.random(diagonal=False)
    linears = decoder_linears(model)
    v = torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = hessian_quadratic_form(model, linears, {"layers.0": v}, WINDOWS)
    flat = v.reshape(-1)
    assert got == pytest.approx((flat @ model.A @ flat).item(), rel=1e-9)
    # off-diagonal terms count: the diagonal alone gives a different number
    assert abs(got - (model.A.diagonal() * flat.square()).sum().item()) > 1e-3 * abs(got)
    assert linears["layers.0"].weight.requires_grad and linears["layers.0"].weight.grad is None
    with pytest.raises(ValueError, match="no directions"):
        hessian_quadratic_form(model, linears, {}, WINDOWS)


def test_hessian_quadratic_form_on_tiny_llama_matches_gradient_difference():
    model = make_tiny_llama().double()
    linears = decoder_linears(model)
    windows = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    names = ["model.layers.0.self_attn.v_proj", "model.layers.1.mlp.up_proj"]  # two weights: cross terms too
    gen = torch.Generator().manual_seed(1)
    v = {n: torch.randn(linears[n].weight.shape, generator=gen, dtype=torch.float64) * 1e-2 for n in names}
    got = hessian_quadratic_form(model, linears, v, windows, loss_fn=_float64_lm_loss)

    def directional_gradient(shift: float) -> float:  # d/ds L(W + s v) at s = shift, mean over windows
        with torch.no_grad():
            for n in names:
                linears[n].weight.add_(shift * v[n])
        params = [linears[n].weight for n in names]
        with sdpa_kernel([SDPBackend.MATH]):
            total = 0.0
            for x in windows:
                grads = torch.autograd.grad(_float64_lm_loss(model, x[None]), params)
                total += sum(float((g * v[n]).sum()) for g, n in zip(grads, names))
        with torch.no_grad():
            for n in names:
                linears[n].weight.sub_(shift * v[n])
        return total / len(windows)

    h = 1e-3
    assert got == pytest.approx((directional_gradient(h) - directional_gradient(-h)) / (2 * h), rel=1e-3)
    assert all(p.grad is None for p in model.parameters())
