"""Gradient plumbing shared by every score that needs a backward pass: loss, batching, which weights get
gradients, the diagonal Fisher and the path integral of gradients (PQI's inner part)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.restore import values_restored

LossFn = Callable[[nn.Module, Tensor], Tensor]


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a batch of windows [B, L] (labels = inputs, every token counts)."""
    return model(input_ids=batch, labels=batch).loss


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    return next(model.parameters(), torch.empty(0)).device


def window_batches(windows: Tensor, batch_size: int) -> list[Tensor]:
    """Split calibration windows [n, L] into batches of ``batch_size`` rows (the last may be smaller)."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if windows.dim() != 2 or windows.size(0) == 0:
        raise ValueError(f"calibration windows must be a non-empty [n, L] tensor, got shape {tuple(windows.shape)}")
    return list(windows.split(batch_size))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, LoRA dropout included) inside the block; every module's own flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def grads_only_on(model: nn.Module, weights: Mapping[str, nn.Parameter]) -> Iterator[None]:
    """Inside the block only ``weights`` require grad, and they start with ``.grad = None``.

    Every other parameter (LoRA factors, embeddings, norms) is switched off, so autograd neither
    spends time on it nor writes into its ``.grad``. On exit every ``requires_grad`` flag and the
    ``.grad`` the targets had before are put back.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    target_ids = {id(w) for w in weights.values()}
    stashed = {name: w.grad for name, w in weights.items()}
    try:
        for p, _ in flags:
            p.requires_grad_(id(p) in target_ids)
        for w in weights.values():
            w.requires_grad_(True)  # also when a target is not registered under ``model``
            w.grad = None
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for name, w in weights.items():
            w.grad = stashed[name]


def _accumulate_gradients(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    batches: list[Tensor],
    loss_fn: LossFn,
    sums: dict[str, Tensor] | None = None,
    squares: dict[str, Tensor] | None = None,
    progress: bool = False,
    desc: str = "",
    bar: tqdm | None = None,
) -> None:
    """Add Σ_batches g into ``sums`` and/or Σ_batches g² into ``squares`` (float32), g = ∂loss_batch/∂W.

    ``bar``: an outer progress bar to advance once per batch instead of drawing a bar here.

    A post-accumulate-grad hook folds each gradient into its accumulators the moment autograd
    has finished it and drops ``.grad`` at once, so at most one dense gradient per weight is
    alive at a time and no copy of all gradients is ever held.
    """
    weights = {name: linear.weight for name, linear in linears.items()}

    def make_hook(name: str) -> Callable[[Tensor], None]:
        def hook(param: Tensor) -> None:
            g = param.grad.float()
            if sums is not None:
                sums[name].add_(g)
            if squares is not None:
                squares[name].add_(g.square())
            param.grad = None

        return hook

    device = model_device(model)
    with eval_mode(model), grads_only_on(model, weights), torch.enable_grad():
        handles = [w.register_post_accumulate_grad_hook(make_hook(name)) for name, w in weights.items()]
        try:
            for batch in tqdm(batches, desc=desc, leave=False, disable=not progress or bar is not None):
                stop_if_interrupted()
                loss_fn(model, batch.to(device)).backward()
                if bar is not None:
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()


def _zeros_like_weights(linears: Mapping[str, nn.Linear]) -> dict[str, Tensor]:
    return {name: torch.zeros(lin.weight.shape, dtype=torch.float32, device=lin.weight.device) for name, lin in linears.items()}


def fisher_diagonal(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    windows: Tensor,
    batch_size: int = 1,
    progress: bool = True,
    loss_fn: LossFn | None = None,
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher F = Σ_b (∂L_b/∂W)² of each weight in ``linears`` (float32).

    L_b is the mean next-token loss of window batch b. With the default ``batch_size=1`` this is
    the NPFT reference's unnormalised sum over single windows (it never zeroes ``.grad`` and
    squares each window's gradient); a larger batch squares the batch-mean gradient instead,
    which is cheaper but a different (smaller, smoother) statistic.

    No LoRA merge is needed: a LoRA layer computes x Wᵀ + x (BA)ᵀ·s, so ∂L/∂W equals the
    gradient with respect to the merged weight W + s·BA, and this is the Fisher of the merged
    model. The model runs in eval mode (no dropout, also in the adapters); LoRA parameters
    are frozen during the pass, so their ``requires_grad`` and ``.grad`` are left as they were.
    """
    loss_fn = loss_fn or causal_lm_loss
    acc = _zeros_like_weights(linears)
    batches = window_batches(windows, batch_size)
    _accumulate_gradients(model, linears, batches, loss_fn, squares=acc, progress=progress, desc="fisher")
    return acc


def gradient_moments(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    windows: Tensor,
    batch_size: int = 1,
    progress: bool = True,
    loss_fn: LossFn | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Mean gradient ḡ = (1/B) Σ_b ∂L_b/∂W and mean squared gradient F̄ = (1/B) Σ_b (∂L_b/∂W)², one pass.

    B is the number of window batches and L_b the mean next-token NLL of batch b, so ḡ is the
    gradient of the mean calibration loss and F̄ = ``fisher_diagonal`` / B: both are on the scale
    of a change of the mean per-token loss, which is what ``taylor_loss_change`` predicts.
    """
    loss_fn = loss_fn or causal_lm_loss
    sums, squares = _zeros_like_weights(linears), _zeros_like_weights(linears)
    batches = window_batches(windows, batch_size)
    _accumulate_gradients(model, linears, batches, loss_fn, sums=sums, squares=squares, progress=progress, desc="gradients")
    for acc in (sums, squares):
        for t in acc.values():
            t.div_(len(batches))
    return sums, squares


def taylor_loss_change(delta: Tensor, fisher: Tensor, grad: Tensor | None = None) -> float:
    """Predicted L(W + Δ) − L(W) from a diagonal second-order expansion: Σ g·Δ + ½ Σ F·Δ².

    Without ``grad`` it is the curvature term ½ Σ F·Δ² alone (the Fisher sensitivity of
    SqueezeLLM / NPFT, which assumes a minimum). Exact for a quadratic loss whose Hessian is the
    diagonal ``fisher``. With F̄ from ``gradient_moments`` (per-window gradients of a mean loss)
    the curvature term is biased low: the mean over T tokens shrinks the per-token gradient
    variance by up to T, while the Hessian of the mean loss is not shrunk.
    """
    d = delta.double()
    change = 0.5 * float((fisher.double() * d.square()).sum())
    if grad is not None:
        change += float((grad.double() * d).sum())
    return change


def pqi_along(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    error: Mapping[str, Tensor],
    windows: Tensor,
    intervals: int = 32,
    batch_size: int = 1,
    progress: bool = True,
    signed: bool = False,
    loss_fn: LossFn | None = None,
    desc: str = "pqi",
) -> dict[str, Tensor]:
    """PQI of the straight path from the weights the linears hold now, W, to W + ``error``:
    |error_i · (1/N) Σ_k ∂L/∂W_i (W + t_k · error)|, t_k = (k − ½)/N (``signed``: without |·|).

    The integral part of :func:`pqi_scores`, for a target that is not one quantizer's output (ReQuant's
    dense + sparse model). ``error`` (float32, shaped like each weight) is consumed; weights are
    restored bit-exactly at the end.
    """
    if intervals < 1:
        raise ValueError(f"pqi intervals={intervals} must be >= 1 (the paper uses 32)")
    loss_fn = loss_fn or causal_lm_loss
    batches = window_batches(windows, batch_size)
    weights = {name: lin.weight for name, lin in linears.items()}
    acc = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    # One bar over all intervals × batches: a single interval is already a full calibration pass.
    with values_restored(weights) as originals, tqdm(total=intervals * len(batches), desc=desc, unit="pass",
                                                      leave=False, disable=not progress) as bar:
        for k in range(intervals):
            t = (k + 0.5) / intervals
            bar.set_postfix_str(f"interval {k + 1}/{intervals}, t={t:.3f}")
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_((originals[name].float() + t * error[name]).to(w.dtype))
            _accumulate_gradients(model, linears, batches, loss_fn, sums=acc, bar=bar)

    scores = {}
    for name in weights:
        s = error.pop(name).mul_(acc.pop(name)).div_(intervals)
        scores[name] = s if signed else s.abs_()
    return scores
