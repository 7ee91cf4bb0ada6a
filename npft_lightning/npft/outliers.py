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
from typing import Mapping

import torch
from torch import Tensor, nn

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.gradients import (
    LossFn,
    fisher_diagonal,
    pqi_along,
    window_batches,
)
from npft_lightning.core.topk import global_top_k, largest_remainder, top_k_flat
from npft_lightning.quant.base import WeightQuantizer, fake_quantized

METHODS = ("fisher", "magnitude", "pqi", "damage", "all")
BUDGETS = ("per_matrix", "global", "adaptive")
REFRESH = ("once", "epoch")




# --------------------------------------------------------------------------------------------
# Shared plumbing for gradient passes
# --------------------------------------------------------------------------------------------














# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------








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
            name: top_k_flat(scores[name], max(1, round(scores[name].numel() * ratio / 100)))
            for name in names
        }

    numels = [scores[name].numel() for name in names]
    total = min(max(1, round(sum(numels) * ratio / 100)), sum(numels))
    if budget == "adaptive":
        mass = [float(scores[name].double().sum()) for name in names]
        counts = largest_remainder(mass, numels, total)
        return {name: top_k_flat(scores[name], k) for name, k in zip(names, counts)}

    return global_top_k({name: scores[name] for name in names}, total)




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
