"""Weight sensitivity scores and outlier selection: where NPFT puts its noise.

Three scores, each a float32 tensor shaped like the weight it scores:

* ``fisher``: the diagonal empirical Fisher Σ_windows (∂L_w/∂W)², one window per backward
  (the NPFT reference code, after SqueezeLLM);
* ``magnitude``: |W|, the cheap baseline;
* ``pqi``: the post-quantization integral of Hu et al. (2025), |ΔW ⊙ ∫₀¹ ∇L(W + tΔW) dt| with
  ΔW = Q(W) − W, which is how much each weight's quantization error moves the loss.

A *mask* is a sorted 1-D int32 (int64 past 2³¹ entries) tensor of flat indices into ``weight.view(-1)``; ``masks`` maps the
canonical linear name to its mask. ``select_outliers`` turns scores into masks, per matrix (the
reference), under one global threshold, or with a global budget spread by sensitivity mass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from npft_lightning import masks as mask_ops
from npft_lightning.quant.base import WeightQuantizer, fake_quantized

LossFn = Callable[[nn.Module, Tensor], Tensor]

METHODS = ("fisher", "magnitude", "pqi", "damage", "all")
BUDGETS = ("per_matrix", "global", "adaptive")
REFRESH = ("once", "epoch")


def causal_lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """Mean next-token cross-entropy of a batch of windows [B, L] (labels = inputs, every token counts)."""
    return model(input_ids=batch, labels=batch).loss


# --------------------------------------------------------------------------------------------
# Shared plumbing for gradient passes
# --------------------------------------------------------------------------------------------


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
                loss_fn(model, batch.to(device)).backward()
                if bar is not None:
                    bar.update(1)
        finally:
            for h in handles:
                h.remove()


def _zeros_like_weights(linears: Mapping[str, nn.Linear]) -> dict[str, Tensor]:
    return {name: torch.zeros(lin.weight.shape, dtype=torch.float32, device=lin.weight.device) for name, lin in linears.items()}


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------


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


@torch.no_grad()
def magnitude_scores(linears: Mapping[str, nn.Linear]) -> dict[str, Tensor]:
    """|W| in float32: the data-free baseline score."""
    return {name: lin.weight.detach().float().abs() for name, lin in linears.items()}


def pqi_scores(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer,
    windows: Tensor,
    intervals: int = 32,
    batch_size: int = 1,
    progress: bool = True,
    signed: bool = False,
    loss_fn: LossFn | None = None,
    deltas: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Post-quantization integral: PQI_i = |ΔW_i · (1/N) Σ_k ∂L/∂W_i (W + t_k ΔW)|, t_k = (k − ½)/N.

    * ΔW = Q(W) − W, with Q the target ``quantizer``; every layer is interpolated at once, so
      the gradients see the whole model move towards its quantized version.
    * The integral ∫₀¹ ∇L(W + tΔW)dt uses the midpoint rule (second-order accurate, exact when
      L is quadratic along the path); the paper's Table 3 shows first-order convergence, so it
      likely used an endpoint Riemann sum. N = 32 is the paper's value.
    * L is the sum over window batches of the batch-mean loss (consistent with ``fisher_diagonal``),
      so Σ_i of the ``signed`` terms ≈ Σ_b [L_b(Q(W)) − L_b(W)], the loss change of quantizing.
    * ``deltas`` (canonical name -> merged LoRA update s·BA) make the quantizer see W + s·BA, the
      weight a user would export, while the adapters stay active: the path then runs from the
      merged weight to its quantized version. Without them the model's current base weights are
      quantized. A calibrated quantizer (GPTQ) gets ``windows`` and runs with the model as it is,
      so disable the adapters around this call as for ``fake_quantized``.
    * Weights are restored bit-exactly at the end. In bf16 the interpolated points are rounded
      to bf16; use an fp32 model for an accurate integral.
    """
    if intervals < 1:
        raise ValueError(f"pqi intervals={intervals} must be >= 1 (the paper uses 32)")
    window_batches(windows, batch_size)  # bad windows fail before the quantizer runs
    weights = {name: lin.weight for name, lin in linears.items()}

    # ΔW = Q(W + D) − (W + D); the merged start is formed exactly as ``fake_quantized`` forms it.
    calibration = windows if quantizer.needs_calibration else None
    with fake_quantized(model, linears, quantizer, deltas, calibration):
        quantized = {name: w.detach().to(torch.float32, copy=True) for name, w in weights.items()}
    error: dict[str, Tensor] = {}
    for name, w in weights.items():  # restored bit-exactly by fake_quantized
        start = w.detach() if deltas is None or name not in deltas else w.detach() + deltas[name].to(w.dtype)
        error[name] = quantized.pop(name) - start.float()
    return pqi_along(model, linears, error, windows, intervals, batch_size, progress, signed, loss_fn)


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
    originals = {name: w.detach().clone() for name, w in weights.items()}
    acc = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    # One bar over all intervals × batches: a single interval is already a full calibration pass.
    bar = tqdm(total=intervals * len(batches), desc=desc, unit="pass", leave=False, disable=not progress)
    try:
        for k in range(intervals):
            t = (k + 0.5) / intervals
            bar.set_postfix_str(f"interval {k + 1}/{intervals}, t={t:.3f}")
            with torch.no_grad():
                for name, w in weights.items():
                    w.copy_((originals[name].float() + t * error[name]).to(w.dtype))
            _accumulate_gradients(model, linears, batches, loss_fn, sums=acc, bar=bar)
    finally:
        bar.close()
        with torch.no_grad():
            for name, w in weights.items():
                w.copy_(originals[name])

    scores = {}
    for name in weights:
        s = error.pop(name).mul_(acc.pop(name)).div_(intervals)
        scores[name] = s if signed else s.abs_()
    return scores


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _check_ratio(ratio: float) -> float:
    ratio = float(ratio)
    if not (math.isfinite(ratio) and 0.0 < ratio <= 100.0):
        raise ValueError(
            f"outlier ratio={ratio} is outside (0, 100]; it is a percentage of each matrix, e.g. 0.05 for 0.05 %"
        )
    return ratio


def _top_k_flat(scores: Tensor, k: int, threshold: Tensor | None = None) -> Tensor:
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


def _largest_remainder(mass: list[float], caps: list[int], total: int) -> list[int]:
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


def select_outliers(scores: Mapping[str, Tensor], ratio: float, budget: str = "per_matrix") -> dict[str, Tensor]:
    """Masks (sorted flat int32 indices, int64 for matrices of 2³¹ entries or more) of the most sensitive entries of each matrix.

    ``ratio`` is in PERCENT: 0.05 means 0.05 % of the weights.

    * ``per_matrix`` (the NPFT reference): k = max(1, round(numel · ratio / 100)) largest
      entries of every matrix, exactly k. The reference keeps entries strictly above the k-th
      value, which yields k − 1 (fewer with ties); we take exactly k, ties to the lowest index.
    * ``global``: one threshold over all matrices, total = max(1, round(Σ numel · ratio / 100))
      entries; ties at the threshold go to matrices in name order, then lowest index.
    * ``adaptive`` (after ReQuant's per-layer ratios): the same global total, spread over the
      matrices proportionally to their sensitivity mass Σ scores, rounded by largest remainder
      so the counts sum exactly to the total and none exceeds its matrix; then top-k within
      each matrix. Scores are expected to be non-negative (use |PQI|, not the signed terms).

    Masks live on the device of their scores; a matrix may get an empty mask under
    ``global``/``adaptive``.
    """
    ratio = _check_ratio(ratio)
    if budget not in BUDGETS:
        raise ValueError(f"outlier budget={budget!r} is not one of {', '.join(BUDGETS)}")
    names = sorted(scores)
    for name in names:
        if torch.isnan(scores[name]).any():
            raise ValueError(f"sensitivity scores of {name} contain NaN; recompute them (is the model's loss finite?)")

    if budget == "per_matrix":
        return {
            name: _top_k_flat(scores[name], max(1, round(scores[name].numel() * ratio / 100)))
            for name in names
        }

    numels = [scores[name].numel() for name in names]
    total = min(max(1, round(sum(numels) * ratio / 100)), sum(numels))
    if budget == "adaptive":
        mass = [float(scores[name].double().sum()) for name in names]
        counts = _largest_remainder(mass, numels, total)
        return {name: _top_k_flat(scores[name], k) for name, k in zip(names, counts)}

    return global_top_k({name: scores[name] for name in names}, total)


def global_top_k(scores: Mapping[str, Tensor], total: int) -> dict[str, Tensor]:
    """Masks (sorted flat indices) of the ``total`` largest scores over all matrices together.

    One threshold: everything strictly above it, then ties at it in (name, index) order, so exactly
    ``total`` entries (every entry if ``total`` exceeds them).
    """
    names = sorted(scores)
    total = min(int(total), sum(scores[name].numel() for name in names))
    if total <= 0:
        return {name: _top_k_flat(scores[name], 0) for name in names}
    v = _global_threshold({name: scores[name] for name in names}, total)
    masks: dict[str, Tensor] = {}
    above = {name: int((scores[name].reshape(-1).float() > v.to(scores[name].device)).sum()) for name in names}
    ties_left = total - sum(above.values())
    for name in names:
        flat = scores[name].reshape(-1).float()
        n_ties = min(ties_left, int((flat == v.to(flat.device)).sum()))
        ties_left -= n_ties
        masks[name] = _top_k_flat(flat, above[name] + n_ties, threshold=v.to(flat.device))
    return masks


def mask_bytes(masks: Mapping[str, mask_ops.Mask]) -> int:
    """Memory held by ``masks`` (index tensors, bitmaps; nothing for every-entry masks), in bytes."""
    return sum(mask_ops.nbytes(m) for m in masks.values())


def damage_scores(
    fisher: Mapping[str, Tensor],
    linears: Mapping[str, nn.Linear],
    target: WeightQuantizer,
    deltas: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Expected damage of rounding each weight: F · Δ², Δ the target quantizer's step at that weight.

    Rounding to a grid of step Δ moves a weight by e ~ U[−Δ/2, Δ/2], and the quadratic term of the
    loss change is ½·F·E[e²] = F·Δ²/24: the constant does not change the ranking, so the score is
    F·Δ². Δ is taken on the merged weight W + ΔW_lora when ``deltas`` are given.
    """
    step = getattr(target, "step", None)
    if not callable(step):
        raise ValueError(f"outliers method='damage' needs a target quantizer with a step size (RTN, ggml); "
                         f"{getattr(target, 'name', target)!r} has none")
    scores: dict[str, Tensor] = {}
    for name, linear in linears.items():
        w = linear.weight.detach().float()
        if deltas is not None and name in deltas:
            w = w + deltas[name].to(w.device, torch.float32)
        scores[name] = fisher[name].float() * step(w).to(fisher[name].device).square()
    return scores


# --------------------------------------------------------------------------------------------
# Config object
# --------------------------------------------------------------------------------------------


class OutlierSelector:
    """How to pick the outliers: score method, ratio, budget and calibration (``conf/outliers/*.yaml``).

    ``target`` is the quantizer PQI integrates towards (only ``method="pqi"`` needs it; it may
    be attached after construction). ``refresh="epoch"`` asks the caller to recompute the masks
    on the merged model at every epoch (the reference); ``"once"`` keeps the first masks.
    """

    def __init__(
        self,
        method: str = "fisher",
        ratio: float = 0.05,
        budget: str = "per_matrix",
        calibration_windows: int = 128,
        calibration_length: int = 512,
        calibration_seed: int = 0,
        refresh: str = "once",
        pqi_intervals: int = 32,
        batch_size: int = 1,
        target: WeightQuantizer | None = None,
        progress: bool = True,
    ):
        if method not in METHODS:
            raise ValueError(f"outliers method={method!r} is not one of {', '.join(METHODS)}")
        if budget not in BUDGETS:
            raise ValueError(f"outliers budget={budget!r} is not one of {', '.join(BUDGETS)}")
        if refresh not in REFRESH:
            raise ValueError(f"outliers refresh={refresh!r} is not one of {', '.join(REFRESH)}")
        for key, value, low in (
            ("calibration_windows", calibration_windows, 1),
            ("calibration_length", calibration_length, 2),
            ("pqi_intervals", pqi_intervals, 1),
            ("batch_size", batch_size, 1),
        ):
            if int(value) < low:
                raise ValueError(f"outliers {key}={value} must be an integer >= {low}")
        self.method = method
        self.ratio = _check_ratio(ratio)
        self.budget = budget
        self.calibration_windows = int(calibration_windows)
        self.calibration_length = int(calibration_length)
        self.calibration_seed = int(calibration_seed)
        self.refresh = refresh
        self.pqi_intervals = int(pqi_intervals)
        self.batch_size = int(batch_size)
        if method == "damage" and target is not None and not callable(getattr(target, "step", None)):
            raise ValueError(f"outliers method='damage' needs a target quantizer with a step size (RTN, ggml); "
                             f"{getattr(target, 'name', type(target).__name__)} has none: use outliers=fisher or outliers=pqi with it")
        self.target = target
        self.progress = bool(progress)

    @property
    def needs_calibration(self) -> bool:
        """Whether ``scores`` needs calibration windows (every method but magnitude and all)."""
        return self.method not in ("magnitude", "all")

    @property
    def uses_merged(self) -> bool:
        """Whether the scores are taken on the merged weight W + ΔW_lora (the quantizer-aware methods)."""
        return self.method in ("pqi", "damage")

    def scores(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        windows: Tensor | None,
        loss_fn: LossFn | None = None,
        deltas: Mapping[str, Tensor] | None = None,
        signed: bool = False,
    ) -> dict[str, Tensor]:
        """Sensitivity score of every entry of each weight in ``linears`` (float32).

        ``signed`` only matters for PQI: under DDP sum the signed per-rank terms, then take |·|
        (|Σ_r x_r| is not Σ_r |x_r|). Fisher and magnitude are non-negative and simply add up.
        """
        if self.method == "all":
            raise ValueError("outliers method='all' selects every weight without scores; call select() instead")
        if self.method == "magnitude":
            return magnitude_scores(linears)
        if windows is None:
            raise ValueError(f"outliers method={self.method!r} needs calibration windows; pass them or use 'magnitude'")
        if self.method == "fisher":
            return fisher_diagonal(model, linears, windows, self.batch_size, self.progress, loss_fn)
        if self.target is None:
            raise ValueError(f"outliers method={self.method!r} needs a target quantizer; set OutlierSelector.target (e.g. the RTN config)")
        if self.method == "damage":
            fisher = fisher_diagonal(model, linears, windows, self.batch_size, self.progress, loss_fn)
            return damage_scores(fisher, linears, self.target, deltas)
        return pqi_scores(
            model, linears, self.target, windows, self.pqi_intervals, self.batch_size, self.progress,
            signed=signed, loss_fn=loss_fn, deltas=deltas,
        )

    def select(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        windows: Tensor | None,
        loss_fn: LossFn | None = None,
        deltas: Mapping[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Masks of the outliers: the top ``ratio`` % of the scores, in their smallest form (``masks.compact``).

        ``method="all"`` selects every entry of every matrix (``masks.AllEntries``) and scores nothing.
        """
        if self.method == "all":
            return {name: mask_ops.AllEntries(linear.weight.numel()) for name, linear in linears.items()}
        scores = self.scores(model, linears, windows, loss_fn, deltas)
        return self.masks_from_scores(scores)

    def masks_from_scores(self, scores: Mapping[str, Tensor]) -> dict[str, mask_ops.Mask]:
        """``select_outliers(scores, ratio, budget)``, each mask as indices, a bitmap or every entry, whichever is smallest."""
        return {name: mask_ops.compact(idx, scores[name].numel())
                for name, idx in select_outliers(scores, self.ratio, self.budget).items()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"
