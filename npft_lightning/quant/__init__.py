"""Weight quantizers behind one interface (:class:`WeightQuantizer`)."""

from npft_lightning.quant.base import WeightQuantizer, fake_quantized, weights_restored
from npft_lightning.quant.rtn import rtn_decode, rtn_encode, rtn_params, rtn_quantize, rtn_step
from npft_lightning.quant.uniform import RTN

__all__ = [
    "RTN",
    "WeightQuantizer",
    "fake_quantized",
    "weights_restored",
    "rtn_decode",
    "rtn_encode",
    "rtn_params",
    "rtn_quantize",
    "rtn_step",
]
