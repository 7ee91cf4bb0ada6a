"""Checks on the composed config that run before anything heavy is loaded, so errors come in seconds.

Each problem raises :class:`UserError` with one line naming the bad value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from npft_lightning.errors import UserError


def _check_quant(name: str, q: DictConfig) -> None:
    bits = q.get("bits")
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise UserError(f"quant.{name}.bits={bits} is outside 2..8; use an integer from 2 to 8")
    group = q.get("group_size")
    if group is not None and not (isinstance(group, int) and group > 0):
        raise UserError(f"quant.{name}.group_size={group} must be a positive integer (a divisor of the input features) or null")


def validate_config(cfg: DictConfig) -> None:
    for name, q in (cfg.get("quant") or {}).items():
        if not isinstance(q, DictConfig) or "_target_" not in q:
            raise UserError(f"quant.{name} is not a quantizer config (no _target_); pick one from conf/quant/")
        _check_quant(name, q)

    noise = cfg.get("noise")
    if noise is not None:
        scale = noise.get("scale")
        if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0):
            raise UserError(f"noise.scale={scale} must be a finite number >= 0 (0 = no noise; noise=none is the control)")
        if noise.get("schedule") not in (None, "per_step", "per_epoch"):
            raise UserError(f"noise.schedule={noise.get('schedule')} is not one of per_step, per_epoch")

    outliers = cfg.get("outliers")
    if outliers is not None:
        ratio = outliers.get("ratio")
        if not isinstance(ratio, (int, float)) or not (0 < ratio <= 100):
            raise UserError(f"outliers.ratio={ratio} must be a percentage in (0, 100]; 0.05 means 0.05 % of each matrix")

    model = cfg.get("model")
    if model is not None and model.get("path"):
        path = Path(str(model.path)).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path={model.path} does not exist; give a folder with config.json and the weights")
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={model.path} has no config.json, so it is not a Hugging Face model folder")
