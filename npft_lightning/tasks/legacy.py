"""Configs written before the package was split into layers (2026-12-04) still build.

A run folder's ``.hydra/config.yaml`` names the ``_target_`` classes where they lived then; every entry
that reads such a file (``export``, a rerun with ``--config-path <run>/.hydra``) maps them to where they
live now. Quantizers kept their module paths (``npft_lightning.quant.*``), so packed artefacts need no map.
"""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, open_dict

LEGACY_TARGETS = {
    "npft_lightning.callbacks.CurvatureProbe": "npft_lightning.training.callbacks.CurvatureProbe",
    "npft_lightning.callbacks.NoisePerturbation": "npft_lightning.training.callbacks.NoisePerturbation",
    "npft_lightning.data.CausalLMDataModule": "npft_lightning.lm.datamodule.CausalLMDataModule",
    "npft_lightning.data.HFDataset": "npft_lightning.lm.corpora.hf_dataset.HFDataset",
    "npft_lightning.data.TextFiles": "npft_lightning.lm.corpora.text_files.TextFiles",
    "npft_lightning.data.WikiVital": "npft_lightning.lm.corpora.wiki_vital.WikiVital",
    "npft_lightning.loggers.ResumableCSVLogger": "npft_lightning.training.loggers.ResumableCSVLogger",
    "npft_lightning.models.CausalLMSpec": "npft_lightning.lm.models.CausalLMSpec",
    "npft_lightning.noise.GaussianNoise": "npft_lightning.npft.noise.GaussianNoise",
    "npft_lightning.noise.NPFTPaperNoise": "npft_lightning.npft.noise.NPFTPaperNoise",
    "npft_lightning.noise.NoNoise": "npft_lightning.npft.noise.NoNoise",
    "npft_lightning.noise.QuantErrorNoise": "npft_lightning.npft.noise.QuantErrorNoise",
    "npft_lightning.noise.UniformStepNoise": "npft_lightning.npft.noise.UniformStepNoise",
    "npft_lightning.perturb.Perturbation": "npft_lightning.npft.perturb.Perturbation",
    "npft_lightning.progress.StepLimitedRichProgressBar": "npft_lightning.training.progress.StepLimitedRichProgressBar",
    "npft_lightning.sensitivity.OutlierSelector": "npft_lightning.npft.outliers.OutlierSelector",
}


def upgrade_targets(cfg: DictConfig | ListConfig) -> int:
    """Rewrite, in place, every ``_target_`` of ``cfg`` that names a pre-layering path; returns how many."""
    changed = 0
    keys = list(cfg.keys()) if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        node = cfg._get_node(key)  # the node itself: interpolations (${hydra:...}) stay unresolved
        if isinstance(node, (DictConfig, ListConfig)):
            changed += upgrade_targets(node)
        elif key == "_target_" and node._value() in LEGACY_TARGETS:
            value = node._value()
            with open_dict(cfg):
                cfg[key] = LEGACY_TARGETS[value]
            changed += 1
    return changed
