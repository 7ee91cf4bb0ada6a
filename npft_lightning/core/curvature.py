"""How curved is the loss at the outliers? Two estimators of Tr(H_MM), H restricted to the masks.

NPFT's claim is that training on W + δ_M lowers the Hessian trace on the outlier coordinates M,
which is what makes their quantization error cheap (ΔL ≈ ½ eᵀHe). Both estimators here use the
mean loss over the calibration window batches, in eval mode, and leave the weights as they were.

* ``perturbation_trace_estimate`` (zero-order, what the paper describes): with δ ~ N(0, σ²) on M,
  E[L(W+δ)] − L(W) ≈ (σ²/2)·Tr(H_MM), so Tr ≈ (2/σ²)(E[L(W+δ)] − L(W)). Antithetic pairs
  (δ, −δ) cancel the first-order term gᵀδ exactly, which otherwise dominates the variance away
  from a minimum.
* ``hutchinson_trace``: E[vᵀHv] over Rademacher v supported on M, with exact Hessian-vector
  products from double backprop. Unbiased, no step size to tune.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.gradients import (
    LossFn,
    causal_lm_loss,
    eval_mode,
    grads_only_on,
    model_device,
    window_batches,
)
from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.restore import values_restored


def _work_dtype(weight: Tensor) -> torch.dtype:
    """float32 for half-precision weights, the weight's own dtype when it is wider (float64)."""
    return torch.promote_types(weight.dtype, torch.float32)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[Tensor], loss_fn: LossFn | None = None) -> float:
    """Mean over window batches of the model's loss (float64 accumulation), no grad, eval mode."""
    loss_fn = loss_fn or causal_lm_loss
    device = model_device(model)
    with eval_mode(model):
        total = 0.0
        for batch in batches:
            stop_if_interrupted()
            total += float(loss_fn(model, batch.to(device)).double())
    return total / len(batches)


@torch.no_grad()
def outlier_sigma(linears: Mapping[str, nn.Linear], masks: Mapping[str, Tensor], c: float = 0.1) -> float:
    """σ = c · mean |w| over all outlier weights: a perturbation size on the scale of the outliers."""
    total, count = 0.0, 0
    for name, idx in masks.items():
        weight = linears[name].weight
        total += float(weight.detach().reshape(-1)[idx.to(weight.device)].double().abs().sum())
        count += idx.numel()
    if count == 0:
        raise ValueError("the masks select no weights; there is no outlier scale to measure")
    return c * total / count


def perturbation_trace_estimate(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    masks: Mapping[str, Tensor],
    windows: Tensor,
    sigma: float,
    draws: int = 4,
    seed: int = 0,
    antithetic: bool = True,
    batch_size: int = 1,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Tr(H_MM) ≈ (2/σ²)(E_δ[L(W+δ)] − L(W)), δ ~ N(0, σ²) i.i.d. on the mask coordinates only.

    ``sigma`` is absolute (see ``outlier_sigma`` for one relative to the outliers' size). Each of
    the ``draws`` evaluates L(W+δ) and, with ``antithetic``, L(W−δ) too. The third-order error is
    O(σ²) relative, and the float precision of the loss limits how small σ can be: use an fp32
    model (a bf16 weight cannot even hold a small δ). The masked weights are restored bit-exactly.

    Returns trace, clean_loss, perturbed_loss (mean over all evaluations), sigma, and stderr of
    the trace over the draws (NaN for one draw).
    """
    sigma = float(sigma)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"perturbation sigma={sigma} must be a finite number > 0")
    if draws < 1:
        raise ValueError(f"perturbation draws={draws} must be >= 1")
    batches = window_batches(windows, batch_size)
    names = [name for name in sorted(masks) if masks[name].numel() > 0]
    weights = {name: linears[name].weight for name in names}
    index = {name: mask_ops.explicit_index(masks[name], w) for name, w in weights.items()}
    generator = torch.Generator().manual_seed(int(seed))
    clean = mean_loss(model, batches, loss_fn)
    per_draw: list[float] = []
    with values_restored(weights, index) as saved:
        for _ in tqdm(range(draws), desc="perturbation", leave=False, disable=not progress):
            deltas = {
                name: torch.randn(idx.numel(), generator=generator).to(idx.device, _work_dtype(weights[name])) * sigma
                for name, idx in index.items()
            }
            losses = []
            for sign in (1.0, -1.0) if antithetic else (1.0,):
                with torch.no_grad():
                    for name, w in weights.items():
                        w.data.view(-1)[index[name]] = (saved[name].to(deltas[name].dtype) + sign * deltas[name]).to(w.dtype)
                losses.append(mean_loss(model, batches, loss_fn))
            per_draw.append(sum(losses) / len(losses))

    estimates = torch.tensor([2.0 / sigma**2 * (p - clean) for p in per_draw], dtype=torch.float64)
    return {
        "trace": float(estimates.mean()),
        "clean_loss": clean,
        "perturbed_loss": sum(per_draw) / len(per_draw),
        "sigma": sigma,
        "stderr": float(estimates.std() / math.sqrt(draws)) if draws > 1 else math.nan,
    }


def hutchinson_trace(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    masks: Mapping[str, Tensor],
    windows: Tensor,
    probes: int = 8,
    seed: int = 0,
    batch_size: int = 1,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> dict[str, float]:
    """Hutchinson estimate of Tr(H_MM) = E_v[vᵀHv], v Rademacher on the mask coordinates, 0 elsewhere.

    Hv comes from double backprop: g = ∂L/∂W with ``create_graph=True``, then ∂(gᵀv)/∂W.
    v is only ever held as its k mask entries (gᵀv and vᵀ(Hv) are gathers), and each probe uses
    the same v for every window batch, so a probe is vᵀ H̄ v for the mean-loss Hessian H̄.
    ``requires_grad`` of all parameters is switched on for the masked base weights only and
    restored afterwards; attention runs on the math SDPA kernel, whose backward is twice
    differentiable. Returns trace (mean over probes), stderr (NaN for one probe) and probes.
    """
    if probes < 1:
        raise ValueError(f"hutchinson probes={probes} must be >= 1")
    loss_fn = loss_fn or causal_lm_loss
    batches = window_batches(windows, batch_size)
    names = [name for name in sorted(masks) if masks[name].numel() > 0]
    weights = {name: linears[name].weight for name in names}
    index = {name: mask_ops.explicit_index(masks[name], w) for name, w in weights.items()}
    if not weights:
        raise ValueError("the masks select no weights; there is no curvature to estimate")
    params = list(weights.values())
    generator = torch.Generator().manual_seed(int(seed))
    device = model_device(model)

    estimates: list[float] = []
    with eval_mode(model), grads_only_on(model, weights), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for _ in tqdm(range(probes), desc="hutchinson", leave=False, disable=not progress):
            v = {
                name: (torch.randint(0, 2, (idx.numel(),), generator=generator) * 2 - 1).to(idx.device, torch.float32)
                for name, idx in index.items()
            }
            total = 0.0
            for batch in batches:
                stop_if_interrupted()
                loss = loss_fn(model, batch.to(device))
                grads = torch.autograd.grad(loss, params, create_graph=True)
                gv = sum((g.reshape(-1)[index[n]].float() * v[n]).sum() for n, g in zip(names, grads))
                hvs = torch.autograd.grad(gv, params, allow_unused=True)
                total += sum(
                    float((hv.reshape(-1)[index[n]].double() * v[n].double()).sum())
                    for n, hv in zip(names, hvs)
                    if hv is not None
                )
            estimates.append(total / len(batches))

    est = torch.tensor(estimates, dtype=torch.float64)
    return {
        "trace": float(est.mean()),
        "stderr": float(est.std() / math.sqrt(probes)) if probes > 1 else math.nan,
        "probes": probes,
    }


def hessian_quadratic_form(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    directions: Mapping[str, Tensor],
    windows: Tensor,
    batch_size: int = 1,
    loss_fn: LossFn | None = None,
    progress: bool = False,
) -> float:
    """vᵀ H̄ v, H̄ the Hessian of the mean loss over the window batches, v = ``directions`` (shaped like each weight).

    Weights not named in ``directions`` are held fixed; cross terms between the named weights
    count. With v = Q(W) − W, g·v + ½ vᵀH̄v is the exact second-order Taylor prediction of the
    quantization loss change, of which ``taylor_loss_change`` with a diagonal Fisher is an
    approximation. One double backprop per batch (math SDPA kernel, as in ``hutchinson_trace``).
    """
    loss_fn = loss_fn or causal_lm_loss
    batches = window_batches(windows, batch_size)
    names = sorted(directions)
    if not names:
        raise ValueError("no directions given; there is no quadratic form to evaluate")
    weights = {name: linears[name].weight for name in names}
    params = [weights[n] for n in names]
    v = [directions[n].to(weights[n].device, weights[n].dtype) for n in names]
    device = model_device(model)
    total = 0.0
    with eval_mode(model), grads_only_on(model, weights), torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
        for batch in tqdm(batches, desc="hvp", leave=False, disable=not progress):
            stop_if_interrupted()
            grads = torch.autograd.grad(loss_fn(model, batch.to(device)), params, create_graph=True)
            gv = sum((g * d).sum() for g, d in zip(grads, v))
            hvs = torch.autograd.grad(gv, params, allow_unused=True)
            total += sum(float((hv.double() * d.double()).sum()) for hv, d in zip(hvs, v) if hv is not None)
    return total / len(batches)
