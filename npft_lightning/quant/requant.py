"""ReQuant (Hu et al. 2025, "Identifying Sensitive Weights via Post-quantization Integral") around any base quantizer.

The weights become a dense low-bit part plus two full-precision sparse parts, W ≈ Q(W_dense) + W_o + W_s:

1. **Pre-quantize** every decoder linear with the base quantizer (RTN, GPTQ, k-means, NF).
2. **Self-adaptive outlier selection** (the paper's Algorithm 1, whose inner criterion is not
   published; ours): a global budget of ``outlier_ratio`` percent of all weights is spread over the
   layers. For each layer l and candidate count k (``outlier_candidates`` × the layer's share at the
   global ratio, 0 always included), the k largest-|w| entries are detached, the rest quantized by the
   layer quantizer, and the layer's loss estimate is E_l(k) = ½ Σ_i F_i (Ŵ_i − W_i)², F the diagonal
   Fisher of the calibration windows (the SqueezeLLM / NPFT sensitivity; the detached entries have
   no error). The counts k_l with Σ k_l = budget that minimise Σ_l E_l(k_l) are taken greedily on each
   layer's lower convex hull of (k, E_l(k)) (the last segment taken may be cut short). The layer
   quantizer is the base itself; for a base that only quantizes whole models (GPTQ) it is RTN on
   the base's grid (``bits``, ``group_size``, ``sym``), so such a base must have one.
3. **Detach** the chosen outliers (largest |w| of each layer, as SqueezeLLM's outliers) to the
   full-precision sparse part and set them to 0 in the dense part.
4. **Re-quantize** the dense part with the base quantizer: its range (and k-means' clustering, which
   gets zero weight there) no longer holds the outliers. GPTQ keeps the outliers at their exact values
   while it runs (its calibration sees dense + outliers, its error compensation treats them as exact).
5. **Step-wise significant-weight detach** (Algorithm 2): ``significant_ratio`` percent of all weights
   are recovered to full precision in ``significant_ratio / significant_step`` steps (the paper: 2). In
   each step PQI is computed on the path from W to the current quantized model (outliers and earlier
   steps' weights already exact, so their ΔW is 0), and the highest-PQI weights over all layers
   together are recovered; the next step recomputes PQI on the updated model.
6. The stored form is the base's dense fields plus one sparse part (``sparse_index``,
   ``sparse_value``: the union of outliers and significant weights, their exact values), so it exports
   and reloads like :class:`~npft_lightning.quant.sparse.DenseAndSparse`.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.restore import weights_restored
from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.sparse import (
    SparseParts,
    encode_dense,
    masked_base_sensitivity,
    with_sparse,
)
from npft_lightning.quant.uniform import RTN


def _number(value: Any) -> float:
    """``value`` as a float; NaN (refused by the range checks) for anything that is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def _percent(key: str, value: Any) -> float:
    shown, value = value, _number(value)
    if not (math.isfinite(value) and 0 <= value < 100):
        raise ValueError(f"requant {key}={shown} is outside [0, 100); it is a percentage of all decoder weights, e.g. 0.45")
    return value


def detach_steps(significant_ratio: float, significant_step: float | None) -> int:
    """Number of detach steps ``significant_ratio / significant_step`` (ValueError unless a whole number >= 1)."""
    if significant_ratio == 0:
        return 0
    if significant_step is None:
        return 1
    step = float(significant_step)
    n = significant_ratio / step if math.isfinite(step) and step > 0 else float("nan")
    if not (math.isfinite(n) and n >= 1 - 1e-9 and abs(n - round(n)) <= 1e-6 * max(1.0, n)):
        raise ValueError(
            f"requant significant_step={significant_step} does not divide significant_ratio={significant_ratio} "
            f"into whole steps; use e.g. significant_step={significant_ratio / 2:g} (2 steps, the paper) or {significant_ratio:g} (1 step)"
        )
    return int(round(n))


def lower_hull(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    """Lower convex hull of (count, loss) points sorted by count (duplicates of a count: the lowest loss)."""
    best: dict[int, float] = {}
    for k, loss in points:
        best[k] = min(loss, best.get(k, math.inf))
    hull: list[tuple[int, float]] = []
    for k, loss in sorted(best.items()):
        while len(hull) >= 2:
            (k0, l0), (k1, l1) = hull[-2], hull[-1]
            if (l1 - l0) * (k - k0) >= (loss - l0) * (k1 - k0):  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        hull.append((k, loss))
    return hull


def allocate_outliers(curves: Mapping[str, Sequence[tuple[int, float]]], total: int) -> dict[str, int]:
    """Per-layer outlier counts summing to ``total`` that minimise the summed loss estimate.

    ``curves[layer]`` holds (count, estimated loss) points, count 0 among them. Greedy on the lower
    convex hulls: the hull segments of all layers are taken in order of loss saved per outlier (a
    layer's own segments come in its order, as the hull's slopes increase); the segment that would
    overshoot the budget is cut short. What the hulls cannot hold goes one by one to layers below
    their largest candidate, in name order (only when the candidates' maxima sum to less).
    """
    counts = {name: 0 for name in curves}
    segments = []
    for order, name in enumerate(sorted(curves)):
        hull = lower_hull(curves[name])
        if hull[0][0] != 0:
            raise ValueError(f"outlier candidates of {name} must include the count 0")
        for j, ((k0, l0), (k1, l1)) in enumerate(zip(hull, hull[1:])):
            segments.append(((l0 - l1) / (k1 - k0), order, j, name, k1 - k0))
    left = int(total)
    for _, _, _, name, size in sorted(segments, key=lambda s: (-s[0], s[1], s[2])):
        if left <= 0:
            break
        take = min(size, left)
        counts[name] += take
        left -= take
    caps = {name: max(k for k, _ in curves[name]) for name in curves}
    for name in sorted(curves):
        if left <= 0:
            break
        take = min(caps[name] - counts[name], left)
        counts[name] += take
        left -= take
    return counts


class ReQuant(SparseParts):
    """PQI-guided dense-and-sparse around ``base`` (see the module docstring for the six steps).

    Budgets are percentages of all decoder weights quantized together: ``outlier_ratio`` (r_o,
    detached by magnitude at self-adaptive per-layer ratios) and ``significant_ratio`` (r_s, detached
    by PQI in ``significant_ratio / significant_step`` steps). The first ``calibration_windows`` of
    the calibration windows (all when None) feed the Fisher (when none is handed over through
    ``sensitivity``) and the PQI passes, with ``pqi_intervals`` midpoint intervals; a base that needs
    calibration (GPTQ) gets all of them. After a run, ``last_detached`` holds each linear's detached
    positions (``outliers`` and one index tensor per PQI step) and ``last_report`` the counts and times.
    """

    needs_calibration = True

    def __init__(
        self,
        base: WeightQuantizer,
        outlier_ratio: float = 0.45,
        significant_ratio: float = 0.05,
        significant_step: float | None = 0.025,
        outlier_candidates: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
        calibration_windows: int | None = None,
        pqi_intervals: int = 32,
        batch_size: int = 1,
        progress: bool = True,
        name: str | None = None,
    ):
        if not isinstance(base, WeightQuantizer):
            raise ValueError(f"requant base={base!r} is not a weight quantizer; pick one from conf/quant/ (rtn4, gptq3_g32, kmeans3, nf4)")
        if isinstance(base, SparseParts) or not base.stores_weights or getattr(base, "activation", None) is not None:
            raise ValueError(f"requant base {base.name} must be a plain weight-only quantizer with a stored form "
                             "(rtn*, gptq*, kmeans*, nf4), not a sparse or activation quantizer")
        self.base = base
        self.outlier_ratio = _percent("outlier_ratio", outlier_ratio)
        self.significant_ratio = _percent("significant_ratio", significant_ratio)
        if self.outlier_ratio + self.significant_ratio >= 100:
            raise ValueError(f"requant outlier_ratio + significant_ratio = {self.outlier_ratio + self.significant_ratio} "
                             "leaves no dense part; keep their sum below 100")
        self.significant_step = None if significant_step is None else _number(significant_step)
        self.steps = detach_steps(self.significant_ratio, self.significant_step)
        candidates = [_number(c) for c in outlier_candidates] if isinstance(outlier_candidates, Sequence) else []
        if not candidates or any(not (math.isfinite(c) and c >= 0) for c in candidates) or max(candidates) < 1:
            raise ValueError(f"requant outlier_candidates={list(outlier_candidates)} must be factors >= 0 of the outlier "
                             "ratio, at least one of them >= 1 (so the budget fits), e.g. [0.25, 0.5, 1, 2, 4]")
        self.outlier_candidates = tuple(candidates)
        for key, value in (("pqi_intervals", pqi_intervals), ("batch_size", batch_size), ("calibration_windows", calibration_windows)):
            if value is None and key == "calibration_windows":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"requant {key}={value} must be an integer >= 1" + (" or null (all)" if key == "calibration_windows" else ""))
        self.calibration_windows = calibration_windows
        self.pqi_intervals = int(pqi_intervals)
        self.batch_size = int(batch_size)
        self.progress = bool(progress)
        self.layer_quantizer = self._layer_quantizer() if self.outlier_ratio > 0 else None
        self.name = name or f"requant_{base.name}_o{self.outlier_ratio:g}_s{self.significant_ratio:g}"
        self.sensitivity: dict[str, Tensor] | None = None  # Fisher scores, handed over by eval.py / the fake-quant callback
        self.last_detached: dict[str, dict[str, Any]] = {}
        self.last_report: dict[str, Any] = {}

    def _layer_quantizer(self) -> WeightQuantizer:
        """The quantizer of one matrix for the outlier search: the base, or RTN on a model-level base's grid."""
        if not self.base.needs_calibration:
            return self.base
        bits, group, sym = (getattr(self.base, key, None) for key in ("bits", "group_size", "sym"))
        if not isinstance(bits, int) or not hasattr(self.base, "group_size"):
            raise ValueError(
                f"requant base {self.base.name} quantizes whole models and has no RTN grid (bits, group_size) to estimate "
                "each layer's loss in the outlier search; use a base with one (gptq*) or outlier_ratio=0"
            )
        return RTN(bits, group, bool(sym))

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        raise NotImplementedError("ReQuant needs the model and calibration windows: call quantize_model(model, linears, calibration)")

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        raise NotImplementedError("ReQuant needs the model and calibration windows: call encode_model(model, linears, calibration)")

    @torch.no_grad()
    def encode_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """The base's dense fields plus the sparse part of every linear (on the CPU); the model is left unchanged."""
        timer = {"start": time.perf_counter()}
        n_weights = sum(lin.weight.numel() for lin in linears.values())
        fisher = self.sensitivity
        with weights_restored(linears) as originals:  # read as W below; put back on exit
            if self.outlier_ratio > 0 and fisher is None:
                from npft_lightning.core.gradients import fisher_diagonal

                fisher = fisher_diagonal(model, linears, self._windows(calibration), self.batch_size, self.progress)
            outliers = self.select_outliers(originals, fisher, round(n_weights * self.outlier_ratio / 100))
            timer["outliers"] = time.perf_counter()
            # 3-4: detach the outliers, re-quantize the dense rest.
            dense = encode_dense(self.base, model, linears, outliers, calibration, fisher)
            timer["dense"] = time.perf_counter()
            detached = {name: mask.clone() for name, mask in outliers.items()}
            current = {}
            for name, w in originals.items():
                q = self.base.decode_weight(dense[name]).to(device=w.device, dtype=w.dtype)
                current[name] = torch.where(detached[name], w, q)
            # 5: step-wise significant-weight detach, PQI recomputed on the updated model each step.
            steps = self.detach_significant(model, linears, calibration, originals, current, detached,
                                            round(n_weights * self.significant_ratio / 100))
            timer["significant"] = time.perf_counter()
        fields = {
            name: with_sparse({k: v.cpu() for k, v in dense[name].items()}, detached[name].cpu(), originals[name][detached[name]].cpu())
            for name in linears
        }
        self.last_detached = {
            name: {"outliers": outliers[name].flatten().nonzero().squeeze(1).cpu(),
                   "significant": [step[name].cpu() for step in steps]}
            for name in linears
        }
        self.last_report = {
            "weights": n_weights,
            "outliers": {name: int(m.sum()) for name, m in outliers.items()},
            "significant_per_step": [int(sum(idx.numel() for idx in step.values())) for step in steps],
            "seconds": {"outlier_search": timer["outliers"] - timer["start"], "dense": timer["dense"] - timer["outliers"],
                        "significant": timer["significant"] - timer["dense"]},
        }
        return fields

    def _windows(self, calibration: Tensor | None) -> Tensor:
        if calibration is None or calibration.numel() == 0:
            raise ValueError(f"quantizer {self.name} needs calibration token windows (a LongTensor [n_windows, seq_len]) "
                             "for its Fisher and PQI passes")
        calibration = calibration if calibration.dim() == 2 else calibration[None]
        return calibration if self.calibration_windows is None else calibration[: self.calibration_windows]

    def select_outliers(self, weights: Mapping[str, Tensor], fisher: Mapping[str, Tensor] | None, total: int) -> dict[str, Tensor]:
        """Boolean masks of the outliers: ``total`` largest-|w| entries, counts per layer by :func:`allocate_outliers`."""
        masks = {name: torch.zeros(w.shape, dtype=torch.bool, device=w.device) for name, w in weights.items()}
        if total <= 0:
            return masks
        n_weights = sum(w.numel() for w in weights.values())
        curves, tops = {}, {}
        for name, w in tqdm(weights.items(), desc=f"{self.name} outlier search", leave=False, disable=not self.progress):
            stop_if_interrupted()
            w = w.detach().float()
            share = w.numel() * total / n_weights
            counts = sorted({0, *(min(w.numel(), round(c * share)) for c in self.outlier_candidates)})
            tops[name] = w.abs().flatten().topk(counts[-1]).indices  # descending |w|
            f = None if fisher is None else fisher.get(name)
            f = torch.ones_like(w) if f is None else f.to(w.device).float()
            curves[name] = [(k, self._layer_loss(name, w, f, tops[name][:k])) for k in counts]
        for name, k in allocate_outliers(curves, total).items():
            masks[name].view(-1)[tops[name][:k]] = True
        return masks

    def _layer_loss(self, name: str, weight: Tensor, fisher: Tensor, detached: Tensor) -> float:
        """½ Σ F (Ŵ − W)² of one layer quantized with the entries at the flat indices ``detached`` kept exact."""
        mask = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        mask[detached] = True
        mask = mask.reshape(weight.shape)
        with masked_base_sensitivity(self.layer_quantizer, {name: mask}, {name: weight.shape}, {name: fisher}):
            q = self.layer_quantizer.quantize_weight(weight.masked_fill(mask, 0), name=name).float()
        error = torch.where(mask, torch.zeros_like(q), q - weight)
        return 0.5 * float((fisher.double() * error.double().square()).sum())

    def detach_significant(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None,
        originals: Mapping[str, Tensor],
        current: dict[str, Tensor],
        detached: dict[str, Tensor],
        total: int,
    ) -> list[dict[str, Tensor]]:
        """Recover ``total`` weights of the quantized model ``current`` to their ``originals`` in ``self.steps``
        steps, updating ``current`` and ``detached`` in place; the flat indices recovered in each step.

        The linears hold ``originals`` meanwhile. Each step scores the path originals → current by PQI and
        takes the highest scores over all layers together, never a position already detached.
        """
        from npft_lightning.core.gradients import pqi_along
        from npft_lightning.core.topk import global_top_k

        if total <= 0 or self.steps == 0:
            return []
        windows = self._windows(calibration)
        recovered: list[dict[str, Tensor]] = []
        done = 0
        for step in range(self.steps):
            k = round(total * (step + 1) / self.steps) - done
            error = {name: current[name].float() - originals[name].float() for name in linears}
            scores = pqi_along(model, linears, error, windows, self.pqi_intervals, self.batch_size, self.progress,
                               desc=f"{self.name} pqi step {step + 1}/{self.steps}")
            for name in scores:
                scores[name].masked_fill_(detached[name], -1.0)  # |PQI| >= 0: a detached weight is never chosen again
            chosen = global_top_k(scores, k)
            for name, idx in chosen.items():
                idx = idx.long()
                detached[name].view(-1)[idx] = True
                current[name].view(-1)[idx] = originals[name].view(-1)[idx]
            recovered.append({name: idx.long() for name, idx in chosen.items()})
            done += k
        return recovered

    def __repr__(self) -> str:
        return (f"ReQuant(base={self.base!r}, outlier_ratio={self.outlier_ratio}, significant_ratio={self.significant_ratio}, "
                f"significant_step={self.significant_step}, outlier_candidates={self.outlier_candidates}, "
                f"calibration_windows={self.calibration_windows}, pqi_intervals={self.pqi_intervals}, "
                f"batch_size={self.batch_size}, name={self.name!r})")
