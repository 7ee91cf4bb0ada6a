"""The NPFT callbacks on a tiny model: exact restore, noise timing, fake-quant equals a hand merge."""

from __future__ import annotations

import copy
import types

import lightning.pytorch as pl
import pytest
import torch
from helpers import WeightSpy, make_datamodule, make_module, snapshot

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.npft.noise import NoNoise, UniformStepNoise
from npft_lightning.npft.outliers import OutlierSelector
from npft_lightning.quant import RTN
from npft_lightning.training.callbacks import (
    FakeQuantValidation,
    NoisePerturbation,
    OutlierSelection,
)


def test_fake_quant_restores_bit_exactly_and_matches_a_hand_merge():
    module, dm = make_module(), make_datamodule()
    trainer = types.SimpleNamespace(datamodule=dm)
    before = snapshot(module)
    callback = FakeQuantValidation({"rtn3": RTN(3)})
    result = callback.quantized_ppl(trainer, module)
    after = snapshot(module)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The same number computed by hand: merge with PEFT, quantize the decoder linears, evaluate.
    merged = copy.deepcopy(module.model).merge_and_unload()
    with torch.no_grad():
        for linear in decoder_linears(merged).values():
            linear.weight.copy_(RTN(3).quantize_weight(linear.weight))
    expected = perplexity(*dataset_nll(merged, dm.val_dataloader()))
    assert result["rtn3"] == pytest.approx(expected, rel=1e-5)
    assert result["rtn3"] != pytest.approx(perplexity(*module.dataset_nll(dm.val_dataloader())), rel=1e-4)


def fit_with_noise(distribution, accumulate: int = 1, steps: int = 2, schedule: str = "per_step"):
    module, dm = make_module(), make_datamodule()
    clean = {k: v.weight.detach().clone() for k, v in module.decoder_linears().items()}
    selector = OutlierSelector(method="magnitude", ratio=5.0)
    spy = WeightSpy()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[OutlierSelection(selector), NoisePerturbation(distribution, schedule=schedule, seed=3), spy],
    )
    trainer.fit(module, datamodule=dm)
    return module, clean, spy


def test_per_step_noise_touches_only_masks_and_is_removed_bit_exactly():
    module, clean, spy = fit_with_noise(UniformStepNoise(scale=1.0, bits=4))
    masks = module.outlier_masks
    for seen in spy.seen:
        for name, w in seen.items():
            changed = (w != clean[name]).reshape(-1).nonzero().flatten()
            assert set(changed.tolist()) <= set(mask_ops.index(masks[name]).tolist())
        assert any(not torch.equal(seen[n], clean[n]) for n in seen)
    for after in spy.after:  # removed after every optimizer step
        assert all(torch.equal(after[n], clean[n]) for n in after)
    # Two steps, two different draws.
    assert any(not torch.equal(spy.seen[0][n], spy.seen[1][n]) for n in clean)


def test_accumulated_micro_batches_share_one_draw():
    _, clean, spy = fit_with_noise(UniformStepNoise(scale=1.0, bits=4), accumulate=2, steps=2)
    assert len(spy.seen) == 4
    assert all(torch.equal(spy.seen[0][n], spy.seen[1][n]) for n in clean)
    assert all(torch.equal(spy.seen[2][n], spy.seen[3][n]) for n in clean)
    assert any(not torch.equal(spy.seen[1][n], spy.seen[2][n]) for n in clean)
    # Between the micro-batches of one step the noise stays; after the step it is gone.
    assert any(not torch.equal(spy.after[0][n], clean[n]) for n in clean)
    assert all(torch.equal(spy.after[1][n], clean[n]) for n in clean)


def test_same_seed_same_noise():
    _, _, spy_a = fit_with_noise(UniformStepNoise(scale=1.0, bits=4))
    _, _, spy_b = fit_with_noise(UniformStepNoise(scale=1.0, bits=4))
    assert all(torch.equal(spy_a.seen[i][n], spy_b.seen[i][n]) for i in range(2) for n in spy_a.seen[i])


def test_control_leaves_weights_untouched():
    _, clean, spy = fit_with_noise(NoNoise())
    assert all(torch.equal(seen[n], clean[n]) for seen in spy.seen for n in clean)


def test_per_epoch_noise_is_held_for_the_epoch():
    _, clean, spy = fit_with_noise(UniformStepNoise(scale=1.0, bits=4), steps=3, schedule="per_epoch")
    assert all(torch.equal(spy.seen[0][n], spy.seen[2][n]) for n in clean)
    assert any(not torch.equal(spy.seen[0][n], clean[n]) for n in clean)


class RecordingLogger(pl.loggers.Logger):
    """Keeps every logged metric dict in memory."""

    def __init__(self):
        super().__init__()
        self.logged: dict[str, float] = {}

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.logged.update(metrics)


def test_curvature_probe_logs_both_estimators_before_and_after():
    from npft_lightning.core.curvature import (
        hutchinson_trace,
        perturbation_trace_estimate,
    )
    from npft_lightning.training.callbacks import CurvatureProbe

    module, dm = make_module(), make_datamodule()
    selector = OutlierSelector(method="magnitude", ratio=5.0)
    probe = CurvatureProbe(windows=2, length=32, draws=2, hutchinson_probes=2)
    logger = RecordingLogger()
    # what the "before" probe must see: the masks and windows it will use, on the untrained module
    selection = OutlierSelection(selector)
    masks_expected = selector.select(module.model, module.decoder_linears(), None)
    windows = dm.calibration_windows(2, 32, seed=probe.seed)
    expected_hutchinson = hutchinson_trace(module.model, module.decoder_linears(), masks_expected, windows, probes=2, seed=probe.seed)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[selection, probe, NoisePerturbation(UniformStepNoise(scale=1.0, bits=4), seed=3)],
    )
    trainer.fit(module, datamodule=dm)

    for stage in ("before", "after"):
        result = probe.results[stage]
        assert {"curvature_outliers", "hutchinson_outliers", "clean_loss", "sigma"} <= set(result)
        assert all(torch.isfinite(torch.tensor(v)) for v in result.values())
        for key in ("curvature_outliers", "hutchinson_outliers"):
            assert logger.logged[f"{stage}/{key}"] == pytest.approx(result[key])
    assert probe.results["before"]["hutchinson_outliers"] == pytest.approx(expected_hutchinson["trace"], rel=1e-5)
    perturbation = perturbation_trace_estimate(module.model, module.decoder_linears(), module.outlier_masks, windows,
                                               probe.sigma, draws=2, seed=probe.seed)
    assert probe.results["after"]["curvature_outliers"] == pytest.approx(perturbation["trace"], rel=1e-5)
    # training moved the model: the after-probe is a new measurement, not a copy of the before one
    assert probe.results["after"]["hutchinson_outliers"] != probe.results["before"]["hutchinson_outliers"]
