"""Objects built from the config's groups with Hydra's ``instantiate``."""

from __future__ import annotations

from typing import Any, Mapping

from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.calibration import CalibrationSpec
from npft_lightning.quant.importance import ImportanceLookup

IMATRIX_CALIBRATION = "calibration"  # train.py imatrix=calibration: computed at the start of training


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


def imatrix_targets(noise_target: WeightQuantizer | None, quantizers: Mapping[str, WeightQuantizer]) -> list[ImportanceLookup]:
    """What train.py's ``imatrix`` weights: the noise's target quantizer and the fake-quant validation's quantizers,
    those that take an importance matrix (ggml and llama.cpp types; the others stay unweighted)."""
    return [q for q in (noise_target, *quantizers.values()) if isinstance(q, ImportanceLookup)]
