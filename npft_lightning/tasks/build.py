"""Objects built from the config's groups with Hydra's ``instantiate``."""

from __future__ import annotations

from typing import Any

from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.calibration import CalibrationSpec


def build_quantizers(cfg: Any) -> dict[str, WeightQuantizer]:
    """``cfg.quant`` is a dict of named quantizer configs (``quant=[rtn4,rtn3_g32]`` selects several); name -> quantizer."""
    from hydra.utils import instantiate

    quantizers = {}
    for qcfg in (cfg.get("quant") or {}).values():
        quantizer = instantiate(qcfg)
        quantizers[quantizer.name] = quantizer
    return quantizers


def calibration_spec(cfg: Any) -> CalibrationSpec | None:
    """``cfg.calibration`` (``conf/calibration/default.yaml``): the windows of the quantizers that need them."""
    c = cfg.get("calibration")
    if c is None:  # `~calibration`: fine until a quantizer needs windows or a Fisher (Calibration.drawn says so)
        return None
    return CalibrationSpec(windows=int(c.windows), length=int(c.length), seed=int(c.seed),
                           sensitivity_windows=int(c.sensitivity_windows))
