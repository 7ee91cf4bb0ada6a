"""The package's shape: layers with imports pointing down, no circles (import-linter, pyproject.toml), and configs
written before the package was split into layers still build."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from hydra.utils import get_class
from omegaconf import OmegaConf

from npft_lightning.tasks.legacy import LEGACY_TARGETS, upgrade_targets

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    """Every contract of [tool.importlinter] in pyproject.toml: the layers, core's dependencies, no circles."""
    lint = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run([str(lint if lint.exists() else shutil.which("lint-imports"))], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_legacy_targets_name_classes_that_exist_now():
    for old, new in LEGACY_TARGETS.items():
        assert get_class(new).__name__ == old.rsplit(".", 1)[1], (old, new)


def test_upgrade_rewrites_old_targets_and_leaves_interpolations_unresolved():
    cfg = OmegaConf.create({
        "data": {"_target_": "npft_lightning.data.CausalLMDataModule", "corpus": {"_target_": "npft_lightning.data.WikiVital"}},
        "callbacks": [{"_target_": "npft_lightning.loggers.ResumableCSVLogger", "save_dir": "${hydra:runtime.output_dir}"}],
        "quant": {"rtn4": {"_target_": "npft_lightning.quant.RTN"}},
    })
    assert upgrade_targets(cfg) == 3
    assert cfg.data._target_ == "npft_lightning.lm.datamodule.CausalLMDataModule"
    assert cfg.data.corpus._target_ == "npft_lightning.lm.corpora.wiki_vital.WikiVital"
    assert cfg.callbacks[0]._target_ == "npft_lightning.training.loggers.ResumableCSVLogger"
    assert OmegaConf.to_container(cfg.callbacks[0])["save_dir"] == "${hydra:runtime.output_dir}"
    assert cfg.quant.rtn4._target_ == "npft_lightning.quant.RTN"  # quantizers kept their paths
    assert upgrade_targets(cfg) == 0
