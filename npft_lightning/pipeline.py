"""The training run behind ``train.py``: compose objects from the config, fit, report.

Kept out of ``train.py`` so tests and other entry points can call :func:`train` with a composed
config. The order of the NPFT callbacks matters: outliers are selected before noise is drawn on
them, and the curvature probe and fake-quant validation read the same masks and weights.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from npft_lightning.callbacks import CurvatureProbe, FakeQuantValidation, NoisePerturbation, OutlierSelection
from npft_lightning.io import atomic_write_json
from npft_lightning.models import default_lora_targets
from npft_lightning.module import NPFTModule
from npft_lightning.report import print_summary

log = logging.getLogger(__name__)


def build_quantizers(cfg: DictConfig) -> dict[str, Any]:
    """``cfg.quant`` is a dict of named quantizer configs (``quant=[rtn4,rtn3_g32]`` selects several)."""
    quantizers = {}
    for key, qcfg in (cfg.get("quant") or {}).items():
        quantizer = instantiate(qcfg)
        quantizers[quantizer.name] = quantizer
    return quantizers


def build_callbacks(cfg: DictConfig, quantizers: dict[str, Any]) -> tuple[list[pl.Callback], dict[str, pl.Callback]]:
    """Lightning's callbacks from ``cfg.callbacks`` plus the NPFT ones, in life-cycle order."""
    callbacks: list[pl.Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    noise: NoisePerturbation = instantiate(cfg.noise)
    probe: CurvatureProbe | None = instantiate(cfg.curvature) if cfg.get("curvature") else None
    npft: dict[str, pl.Callback] = {}
    if noise.enabled or probe is not None:
        npft["outliers"] = OutlierSelection(instantiate(cfg.outliers))
    if probe is not None:
        npft["curvature"] = probe
    npft["noise"] = noise
    npft["fake_quant"] = FakeQuantValidation(quantizers)
    return callbacks + list(npft.values()), npft


def build(cfg: DictConfig) -> tuple[NPFTModule, pl.LightningDataModule, pl.Trainer, dict[str, pl.Callback]]:
    """Model, data, callbacks and trainer from a composed config (shared by ``train`` and the benches)."""
    model, tokenizer = instantiate(cfg.model).load()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    lora = instantiate(cfg.peft, _convert_="all")
    if not lora.target_modules:
        lora.target_modules = default_lora_targets(model)
    module = NPFTModule(
        model, lora, optimizer=instantiate(cfg.optimizer),
        warmup_steps=cfg.schedule.warmup_steps, lr_decay=cfg.schedule.lr_decay,
    )
    callbacks, npft = build_callbacks(cfg, build_quantizers(cfg))
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    return module, datamodule, trainer, npft


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune, validate with fake quantization, write ``metrics.json`` and print the before/after table."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    output_dir = Path(cfg.paths.output_dir)
    module, datamodule, trainer, npft = build(cfg)

    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    metrics = collect_metrics(trainer, npft)
    metrics["config"] = OmegaConf.to_container(cfg, resolve=True)
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
        if cfg.get("save_adapter", True):
            module.model.save_pretrained(str(output_dir / "adapter"))
        print_summary(metrics, output_dir)
    return metrics


def collect_metrics(trainer: pl.Trainer, npft: dict[str, pl.Callback]) -> dict[str, Any]:
    """``{"ppl": {"before": {...}, "after": {...}}, "curvature": {...}, "train": {...}}`` for metrics.json."""
    metrics: dict[str, Any] = {"ppl": npft["fake_quant"].results}
    if "curvature" in npft:
        metrics["curvature"] = npft["curvature"].results
    if "outliers" in npft:
        masks = npft["outliers"].masks
        metrics["outliers"] = {"count": sum(m.numel() for m in masks.values()), "matrices": len(masks)}
    metrics["train"] = {
        "global_step": trainer.global_step,
        "epochs": trainer.current_epoch,
        "last_loss": float(trainer.callback_metrics["train/loss"]) if "train/loss" in trainer.callback_metrics else None,
    }
    return metrics
