"""The NPFT life cycle as Lightning callbacks: when to score, perturb and quantize.

The math (how) lives in ``npft.outliers``, ``npft.noise``, ``core.curvature`` and ``quant``; these callbacks
own only the timing, the DDP agreement between ranks and the checkpoint state.
Order matters and is the order the training task builds them in (``tasks/train.py``): outliers are selected
before noise is drawn on them, and the curvature probe reads the same masks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.curvature import hutchinson_trace, perturbation_trace_estimate
from npft_lightning.core.perplexity import perplexity
from npft_lightning.core.restore import saved_values
from npft_lightning.npft.distill import Distillation, DistillTarget
from npft_lightning.npft.noise import (
    RAMPS,
    apply_noise,
    noise_generator,
    restore_noise,
    scale_schedule,
)
from npft_lightning.npft.outliers import OutlierSelector, mask_bytes
from npft_lightning.npft.placement import (
    PLACEMENTS,
    grid_index,
    step_is_perturbed,
    step_share,
)
from npft_lightning.quant.base import NonFiniteQuantization, WeightQuantizer
from npft_lightning.quant.calibration import (
    Calibration,
    CalibrationSpec,
    needs_fisher,
    needs_windows,
)
from npft_lightning.quant.imatrix import (
    ImportanceMatrix,
    collect_imatrix,
    write_imatrix,
)
from npft_lightning.quant.importance import ImportanceLookup, gguf_weight_name
from npft_lightning.quant.scoring import score_quantized

log = logging.getLogger(__name__)


def _shard(windows: Tensor, trainer: pl.Trainer) -> Tensor:
    """This rank's share of a window batch (all windows when not distributed)."""
    return windows[trainer.global_rank :: trainer.world_size] if trainer.world_size > 1 else windows


def _total_steps(trainer: pl.Trainer) -> int:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)


# ------------------------------------------------------------------------------------------ importance
IMATRIX_FILE = "imatrix.gguf"  # in the run folder: eval.py ... llamacpp_types=[Q4_K_M] imatrix=<run>/imatrix.gguf


class ImportanceWeighting(Callback):
    """Weights the run's llama.cpp quantizers (the noise target, the fake-quant validation) by an importance matrix.

    Users ship GGUF files quantized with ``llama-quantize --imatrix``: a recipe trained for such a file targets the
    quantizer weighted as llama.cpp weights it. ``imatrix`` given (a file the training task read), or computed once at
    train start, before the first update, on ``calibration``'s windows of the train split (the windows of eval.py's
    ``imatrix=true``), with the adapters off (LoRA B = 0 then: the pretrained model). Under DDP each rank collects on
    its share of the windows and the sums and token counts are all-reduced, so every rank holds the same matrix.
    Written to ``<run>/imatrix.gguf`` (rank 0) for the export, and kept in the checkpoint: a resumed run uses the
    matrix it started with. Runs first among the NPFT callbacks (the fake-quant score before training needs it).
    """

    def __init__(self, quantizers: Sequence[ImportanceLookup], output_dir: str | os.PathLike, imatrix: ImportanceMatrix | None = None,
                 calibration: CalibrationSpec | None = None, batch_size: int = 1, source: str = "calibration"):
        if imatrix is None and calibration is None:
            raise ValueError("ImportanceWeighting needs an imatrix or the calibration windows to compute one")
        self.quantizers = list(quantizers)
        self.output_dir = Path(output_dir)
        self.imatrix = imatrix
        self.calibration = calibration
        self.batch_size = batch_size
        self.source = source  # "calibration" or the file's path, for metrics.json

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ImportanceMatrix:
        spec = self.calibration
        windows = _shard(trainer.datamodule.calibration_windows(spec.windows, spec.length, seed=spec.seed), trainer)
        corpus = getattr(getattr(trainer.datamodule, "corpus", None), "name", "")
        dataset = f"{corpus} train split: {spec.windows} windows of {spec.length} tokens, seed {spec.seed}"
        model = pl_module.model
        was_training = model.training
        model.eval()  # no dropout in the activations that are measured
        try:
            with pl_module.adapters_disabled():
                names = {name: gguf_weight_name(name) for name in pl_module.decoder_linears()}
                imatrix = collect_imatrix(model, windows.split(self.batch_size), names, dataset)
        finally:
            model.train(was_training)
        if trainer.world_size > 1:
            names = sorted(imatrix.sums)
            flat = torch.cat([imatrix.sums[n] for n in names] + [torch.tensor([float(imatrix.counts[n]) for n in names], dtype=torch.float64)])
            flat = trainer.strategy.reduce(flat.to(pl_module.device), reduce_op="sum").cpu()
            sums = flat[: -len(names)].split([imatrix.sums[n].numel() for n in names])
            imatrix.sums = dict(zip(names, sums))
            imatrix.counts = {n: int(c) for n, c in zip(names, flat[-len(names):].tolist())}
        imatrix.chunks, imatrix.chunk_size = spec.windows, spec.length
        return imatrix

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.imatrix is None:
            self.imatrix = self._collect(trainer, pl_module)
        means = self.imatrix.means()
        for quantizer in self.quantizers:
            quantizer.with_importance(means)
        if trainer.is_global_zero:
            write_imatrix(self.imatrix, self.output_dir / IMATRIX_FILE)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` records of the matrix."""
        if self.imatrix is None:
            return {"source": self.source}
        return {"source": self.source, "path": str(self.output_dir / IMATRIX_FILE), "entries": len(self.imatrix.sums),
                "datasets": list(self.imatrix.datasets), "chunks": self.imatrix.chunks, "chunk_size": self.imatrix.chunk_size}

    def state_dict(self) -> dict[str, Any]:
        return {"imatrix": None if self.imatrix is None else self.imatrix.state(), "source": self.source}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("imatrix")
        if saved is None:
            return
        restored = ImportanceMatrix.from_state(saved)
        if self.imatrix is not None and _differs(self.imatrix, restored):
            rank_zero_warn(f"resuming with the checkpoint's importance matrix ({state_dict.get('source')}); "
                           f"imatrix={self.source} differs from it")
        self.imatrix = restored


def _differs(a: ImportanceMatrix, b: ImportanceMatrix) -> bool:
    return a.counts != b.counts or any(not torch.equal(a.sums[n], b.sums[n]) for n in a.sums)


# ------------------------------------------------------------------------------------------ outliers
class OutlierSelection(Callback):
    """Scores every decoder weight and keeps the top ``ratio`` % as the outlier masks.

    Runs at fit start and, with ``refresh=epoch``, again at the start of every later epoch on the
    current (adapter-merged) model. Under DDP each rank scores a shard of the calibration windows
    and the scores are summed, so all ranks select identical masks. The masks are stored in the
    checkpoint, so a resumed run does not recompute them.
    """

    def __init__(self, selector: OutlierSelector):
        self.selector = selector
        self.masks: dict[str, Tensor] = {}
        self.refreshed_epoch = -1

    def _refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        linears = pl_module.decoder_linears()
        if self.selector.method == "all":  # every decoder weight: no scores, no index masks
            self._set_masks(trainer, pl_module, self.selector.select(pl_module.model, linears, None))
            return
        windows = None
        if self.selector.needs_calibration:
            windows = trainer.datamodule.calibration_windows(
                self.selector.calibration_windows, self.selector.calibration_length, seed=self.selector.calibration_seed
            )
            windows = _shard(windows, trainer)
        pqi = self.selector.method == "pqi"
        distributed = trainer.world_size > 1 and self.selector.needs_calibration
        with torch.inference_mode(False), torch.enable_grad():
            # PQI runs from the merged weight W+BA to Q(W+BA); the adapters stay on meanwhile.
            # Across ranks the signed integrals are summed before taking |.|.
            scores = self.selector.scores(pl_module.model, linears, windows,
                                          deltas=pl_module.lora_deltas() if self.selector.uses_merged else None,
                                          signed=pqi and distributed)
        if distributed:
            scores = {name: trainer.strategy.reduce(s.to(pl_module.device), reduce_op="sum") for name, s in scores.items()}
            if pqi:
                scores = {name: s.abs() for name, s in scores.items()}
        masks = self.selector.masks_from_scores(scores)
        del scores
        self._set_masks(trainer, pl_module, masks)

    def _set_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, masks: dict[str, Any]) -> None:
        linears = pl_module.decoder_linears()
        # Masks live on the weights' device: the per-step noise indexes with them every step.
        self.masks = {name: m.to(pl_module.device) for name, m in masks.items()}
        self.refreshed_epoch = trainer.current_epoch
        pl_module.outlier_masks = self.masks
        n = sum(mask_ops.count(m) for m in self.masks.values())
        total = sum(linears[k].weight.numel() for k in self.masks)
        for logger in trainer.loggers:
            logger.log_metrics({"outliers/count": n, "outliers/fraction_pct": 100 * n / max(total, 1),
                                "outliers/mask_bytes": mask_bytes(self.masks)}, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masks:  # restored from a checkpoint
            self.masks = {name: m.to(pl_module.device) for name, m in self.masks.items()}
            pl_module.outlier_masks = self.masks
            return
        self._refresh(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.selector.refresh == "epoch" and trainer.current_epoch != self.refreshed_epoch:
            self._refresh(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"masks": {k: mask_ops.mask_state(v) for k, v in self.masks.items()}, "refreshed_epoch": self.refreshed_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {k: mask_ops.mask_from_state(v) for k, v in state_dict.get("masks", {}).items()}
        self.refreshed_epoch = int(state_dict.get("refreshed_epoch", -1))


# ------------------------------------------------------------------------------------------ noise
class NoisePerturbation(Callback):
    """Adds noise to the outlier coordinates of the frozen base weights; the LoRA adapters learn under it.

    ``schedule=per_step``: a fresh draw before each optimizer step's first forward pass (the same
    draw for all micro-batches of that step), removed after the optimizer step. ``per_epoch``: one
    draw held for the whole epoch (the reference code). Removal writes the saved original values
    back, so the base weights are restored bit-exactly, and validation always sees clean weights.
    Draws are seeded by (seed, epoch, optimizer step): every DDP rank adds the same noise and a
    resumed run draws what the uninterrupted run would have drawn.

    ``step_probability`` q < 1: each optimizer step is perturbed with probability q and trained on
    the clean weights otherwise, so the expected loss is (1 − q)·L(W) + q·E[L(W + δ)], a mixed
    objective at the cost of one forward pass (per_step only). ``placement=last`` draws the perturbed
    steps from the last ``last_fraction`` of the run only, ``step_probability_ramp`` lets q rise from 0
    (:mod:`npft_lightning.npft.placement`). Distributions that need the merged weight (``quant_error``)
    get the LoRA updates of the current adapters with every draw; one with several target grids gets
    the step's grid, drawn from (seed, epoch, step) like the step itself.

    ``distill`` (:class:`~npft_lightning.npft.distill.Distillation`, or its settings): the loss of a
    perturbed step is (partly) the KL divergence from a teacher's next-token distribution, the model on
    the clean weights run without gradient before the draw is written (one more forward pass on the
    perturbed steps only; the clean steps are untouched).
    """

    def __init__(self, distribution: Any, scale: float | None = None, schedule: str = "per_step", seed: int = 0,
                 warmup_steps: int = 0, ramp: str = "constant", step_probability: float = 1.0,
                 placement: str = "random", last_fraction: float = 1.0, step_probability_ramp: str = "constant",
                 distill: Distillation | Mapping[str, Any] | None = None):
        if schedule not in ("per_step", "per_epoch"):
            raise ValueError(f"noise.schedule={schedule!r} is not one of per_step, per_epoch")
        if ramp not in RAMPS:
            raise ValueError(f"noise.ramp={ramp!r} is not one of {', '.join(RAMPS)}")
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"noise.warmup_steps={warmup_steps!r} must be an integer >= 0 (steps without noise at the start)")
        step_probability = float(step_probability)
        if not (0.0 < step_probability <= 1.0):
            raise ValueError(f"noise.step_probability={step_probability} must be in (0, 1]: the share of optimizer steps "
                             f"that see the noise (1 = every step)")
        if step_probability < 1.0 and schedule != "per_step":
            raise ValueError(f"noise.step_probability={step_probability} needs noise.schedule=per_step (a per-epoch draw "
                             f"is held for the whole epoch)")
        if placement not in PLACEMENTS:
            raise ValueError(f"noise.placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
        last_fraction = float(last_fraction)
        if not (0.0 < last_fraction <= 1.0):
            raise ValueError(f"noise.last_fraction={last_fraction} must be in (0, 1]: the last part of the run whose steps "
                             f"may be perturbed with noise.placement=last (e.g. 0.25 for the last quarter)")
        if step_probability_ramp not in RAMPS:
            raise ValueError(f"noise.step_probability_ramp={step_probability_ramp!r} is not one of {', '.join(RAMPS)}")
        if (placement != "random" or step_probability_ramp != "constant") and schedule != "per_step":
            raise ValueError(f"noise.placement={placement} / noise.step_probability_ramp={step_probability_ramp} choose "
                             f"steps, so they need noise.schedule=per_step")
        self.distill = distill if isinstance(distill, Distillation) else Distillation(**(distill or {}))
        if self.distill.enabled and not getattr(distribution, "enabled", True):
            raise ValueError(f"noise.distill.teacher={self.distill.teacher} distils on the perturbed steps, but this noise "
                             f"perturbs none (noise=none): use noise=quant_error, or noise.distill.teacher=null")
        self.step_probability = step_probability
        self.placement = placement
        self.last_fraction = last_fraction
        self.step_probability_ramp = step_probability_ramp
        self.distribution = distribution
        # `noise.scale` lives here only; the schedule writes the current value into the distribution.
        self.base_scale = float(distribution.scale if scale is None else scale)
        self.distribution.scale = self.base_scale
        self.schedule = schedule
        self.seed = seed
        self.warmup_steps = warmup_steps
        self.ramp = ramp
        self._saved: dict[str, Tensor] | None = None
        self._draw: tuple[int, int] | None = None  # (epoch, step) of the applied draw
        self._reapply_after_validation = False
        self._total_steps = 0  # the run's optimizer steps (placement=last and the share ramp need it), set at train start

    @property
    def enabled(self) -> bool:
        return bool(getattr(self.distribution, "enabled", True))

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, step: int) -> None:
        masks = pl_module.outlier_masks
        if not masks:
            raise RuntimeError("noise needs outlier masks, but none were selected: add the OutlierSelection callback before NoisePerturbation")
        self.distribution.scale = scale_schedule(
            trainer.global_step, _total_steps(trainer), self.base_scale, self.warmup_steps, self.ramp
        )
        weights = getattr(self.distribution, "grid_weights", None)
        if weights is not None and len(weights) > 1:
            self.distribution.use_grid(grid_index(self.seed, epoch, step, weights))
        deltas = pl_module.lora_deltas() if getattr(self.distribution, "needs_merged", False) else None
        self._saved = apply_noise(pl_module.decoder_linears(), masks, self.distribution, noise_generator(self.seed, epoch, step), deltas)
        self._draw = (epoch, step)

    def _step_is_perturbed(self, epoch: int, step: int) -> bool:
        """Whether optimizer ``step`` sees the noise: from its own stream (the same on every rank and on resume)."""
        share = step_share(step, self._total_steps, self.step_probability, self.placement, self.last_fraction,
                           self.step_probability_ramp)
        return step_is_perturbed(self.seed, epoch, step, share)

    def _remove(self, pl_module: pl.LightningModule) -> None:
        if self._saved is not None:
            restore_noise(pl_module.decoder_linears(), pl_module.outlier_masks, self._saved)
            self._saved = None

    def _teacher_logits(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Tensor) -> Tensor:
        """The teacher's logits for ``batch`` on the clean base weights: the draw, if one is in place (a later
        micro-batch of the step, a per-epoch draw), is lifted for the teacher's forward pass and put back."""
        linears, masks = pl_module.decoder_linears(), pl_module.outlier_masks
        drawn = None
        if self._saved is not None:
            drawn = {name: saved_values(linears[name].weight.data.view(-1), mask_ops.index(masks[name], linears[name].weight.device))
                     for name in self._saved}
            restore_noise(linears, masks, self._saved)
        try:
            with trainer.precision_plugin.train_step_context():
                return pl_module.teacher_logits(batch, adapters=self.distill.teacher == "self")
        finally:
            if drawn is not None:
                restore_noise(linears, masks, drawn)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._total_steps = _total_steps(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.enabled:
            return
        teacher = None
        if self.schedule == "per_step" and self._saved is None and self._draw != (trainer.current_epoch, trainer.global_step):
            if self._step_is_perturbed(trainer.current_epoch, trainer.global_step):
                if self.distill.enabled:  # before the draw is written: the teacher sees the clean weights
                    teacher = self._teacher_logits(trainer, pl_module, batch)
                self._apply(trainer, pl_module, trainer.current_epoch, trainer.global_step)
                if len(getattr(self.distribution, "grids", ())) > 1:  # perturbed steps only: straight to the loggers
                    for logger in trainer.loggers:
                        logger.log_metrics({"noise/grid": self.distribution.grid}, step=trainer.global_step)
            else:
                self._draw = (trainer.current_epoch, trainer.global_step)  # a clean step: nothing to apply
            pl_module.log("noise/scale", self.distribution.scale if self._saved is not None else 0.0, on_step=True, on_epoch=False)
        elif self._saved is not None and self.distill.enabled:
            teacher = self._teacher_logits(trainer, pl_module, batch)
        if teacher is not None:
            pl_module.distill_target = DistillTarget(teacher, self.distill)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # global_step moves only when the optimizer stepped: keep the draw across accumulated micro-batches.
        if self.schedule == "per_step" and self._draw is not None and trainer.global_step != self._draw[1]:
            self._remove(pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled and self.schedule == "per_epoch":
            self._apply(trainer, pl_module, trainer.current_epoch, -1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reapply_after_validation = self._saved is not None and self.schedule == "per_epoch"
        self._remove(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._reapply_after_validation and self._draw is not None:
            self._apply(trainer, pl_module, *self._draw)
        self._reapply_after_validation = False

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove(pl_module)
        pl_module.distill_target = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove(pl_module)
        pl_module.distill_target = None

    # The draws need no state (they follow from seed, epoch and step); the checkpoint keeps what
    # they follow from, so a resume with other noise settings says so instead of silently mixing.
    # Keys added later default to the value that reproduces a checkpoint written without them.
    STATE_DEFAULTS = {"seed": None, "scale": None, "schedule": None, "step_probability": 1.0, "placement": "random",
                      "last_fraction": 1.0, "step_probability_ramp": "constant", "grid_weights": None,  # None: one grid
                      "distill": (None, 1.0, 1.0)}

    def state_dict(self) -> dict[str, Any]:
        weights = list(getattr(self.distribution, "grid_weights", None) or [])
        return {"seed": self.seed, "scale": self.base_scale, "schedule": self.schedule, "step_probability": self.step_probability,
                "placement": self.placement, "last_fraction": self.last_fraction,
                "step_probability_ramp": self.step_probability_ramp,
                "grid_weights": weights if len(weights) > 1 else None,
                "distill": (self.distill.teacher, self.distill.temperature, self.distill.weight)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: state_dict.get(k, default) for k, default in self.STATE_DEFAULTS.items()}
        saved["distill"] = tuple(saved["distill"])
        current = self.state_dict()
        if saved != current:
            rank_zero_warn(f"resuming with noise settings {current}; the checkpoint was trained with {saved}")


# ------------------------------------------------------------------------------------------ curvature
class CurvatureProbe(Callback):
    """Estimates the loss curvature on the outliers before and after fine-tuning (the mechanism check).

    The zero-order estimator Tr(H_MM) ≈ (2/σ²)(E[L(W+δ)] − L(W)) with δ ~ N(0, σ²) on the masks;
    σ is fixed at the first probe (``sigma_rel`` × mean |w| over the outliers) and reused, so the
    two numbers are comparable. ``hutchinson_probes > 0`` adds a Hutchinson estimate (autograd HVPs).
    """

    def __init__(self, windows: int = 4, length: int = 512, seed: int = 1234, sigma_rel: float = 0.1, draws: int = 4, hutchinson_probes: int = 0):
        self.windows, self.length, self.seed = windows, length, seed
        self.sigma_rel, self.draws, self.hutchinson_probes = sigma_rel, draws, hutchinson_probes
        self.sigma: float | None = None
        self.results: dict[str, dict[str, float]] = {}

    def _probe(self, stage: str, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        masks = pl_module.outlier_masks
        if not masks:
            return
        linears = pl_module.decoder_linears()
        if self.sigma is None:
            values = torch.cat([mask_ops.values(m, linears[n].weight.detach()).float().abs() for n, m in masks.items()])
            self.sigma = self.sigma_rel * float(values.mean())
        windows = trainer.datamodule.calibration_windows(self.windows, self.length, seed=self.seed).to(pl_module.device)
        was_training = pl_module.model.training
        pl_module.model.eval()
        with torch.inference_mode(False), torch.enable_grad():
            est = perturbation_trace_estimate(pl_module.model, linears, masks, windows, self.sigma, draws=self.draws, seed=self.seed,
                                              progress=trainer.is_global_zero)
            result = {"curvature_outliers": est["trace"], "clean_loss": est["clean_loss"], "sigma": self.sigma}
            if self.hutchinson_probes > 0:
                result["hutchinson_outliers"] = hutchinson_trace(pl_module.model, linears, masks, windows, probes=self.hutchinson_probes,
                                                                  seed=self.seed, progress=trainer.is_global_zero)["trace"]
        pl_module.model.train(was_training)
        self.results[stage] = result
        for logger in trainer.loggers:
            logger.log_metrics({f"{stage}/{k}": v for k, v in result.items()}, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "before" not in self.results:
            self._probe("before", trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._probe("after", trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma, "results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sigma = state_dict.get("sigma")
        self.results = dict(state_dict.get("results", {}))


# ------------------------------------------------------------------------------------------ fake quant
class FakeQuantValidation(Callback):
    """After each validation run (and once before training), the PPL of the quantized model per quantizer.

    For each quantizer: merge the adapters into the base weights, quantize every decoder
    ``nn.Linear``, measure perplexity over the validation windows with the adapters disabled, and
    restore the original base weights bit-exactly (:func:`~npft_lightning.quant.scoring.score_quantized`,
    as ``eval.py`` does). ``calibration``: the windows of quantizers that need them (``cfg.calibration``,
    the same as ``eval.py``'s), drawn again for every validation, as is the Fisher of the current model.
    Logs ``val/ppl_<name>``.
    """

    def __init__(self, quantizers: Mapping[str, WeightQuantizer], before_fit: bool = True,
                 calibration: CalibrationSpec | None = None):
        self.quantizers = dict(quantizers)
        uncalibrated = [name for name, q in self.quantizers.items() if needs_windows(q) or needs_fisher(q)]
        if calibration is None and uncalibrated:
            raise ValueError(f"quantizers {', '.join(uncalibrated)} need calibration windows: pass calibration=CalibrationSpec(...)")
        self.before_fit = before_fit
        self.calibration = calibration
        self.results: dict[str, dict[str, float]] = {}
        self.errors: dict[str, str] = {}  # quantizer -> why its PPL is NaN (non-finite quantized weights)

    def quantized_ppl(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        loader = trainer.datamodule.val_dataloader()
        linears = pl_module.decoder_linears()
        deltas = pl_module.lora_deltas()
        calibration = Calibration() if self.calibration is None else Calibration.drawn(
            trainer.datamodule, self.calibration, self.quantizers.values(), pl_module.device)
        out: dict[str, float] = {}
        for name, quantizer in self.quantizers.items():
            try:
                out[name] = score_quantized(pl_module.model, linears, quantizer,
                                            lambda: perplexity(*pl_module.dataset_nll(loader, desc=f"ppl {name}")),
                                            calibration, deltas, pl_module.adapters_disabled)
            except NonFiniteQuantization as err:
                # One broken quantizer must not cost the run: report the layer, record NaN, go on.
                # All ranks hold the same weights, so all of them skip this quantizer's PPL pass.
                rank_zero_warn(str(err))
                self.errors[name] = str(err)
                out[name] = float("nan")
        return out

    def _evaluate_all(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        with torch.inference_mode():
            result = {"fp": perplexity(*pl_module.dataset_nll(trainer.datamodule.val_dataloader(), desc="ppl unquantized"))}
            result.update(self.quantized_ppl(trainer, pl_module))
        return result

    def _log_direct(self, trainer: pl.Trainer, result: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics({"val/ppl" if k == "fp" else f"val/ppl_{k}": v for k, v in result.items()}, step=step)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.before_fit and "before" not in self.results:
            self.results["before"] = self._evaluate_all(trainer, pl_module)
            self._log_direct(trainer, self.results["before"], step=0)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        after = self.quantized_ppl(trainer, pl_module)
        for name, value in after.items():
            pl_module.log(f"val/ppl_{name}", value, sync_dist=False)
        self.results["after"] = after
        self._evaluated_step = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        # The module's own float64 value when it has one (the logged copy is float32).
        ppl = getattr(pl_module, "val_ppl", None)
        if ppl is None and "val/ppl" in trainer.callback_metrics:
            ppl = float(trainer.callback_metrics["val/ppl"])
        if ppl is not None:
            self.results.setdefault("after", {})["fp"] = ppl

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A run stopped by max_steps in mid-epoch skips the epoch-end validation: "after" must still
        # describe the final weights.
        if getattr(self, "_evaluated_step", None) != trainer.global_step:
            self.results["after"] = self._evaluate_all(trainer, pl_module)
            self._evaluated_step = trainer.global_step
            self._log_direct(trainer, self.results["after"], step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.results = dict(state_dict.get("results", {}))


