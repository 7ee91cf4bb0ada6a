"""Weight quantizers behind one interface (:class:`WeightQuantizer`)."""

from npft_lightning.core.restore import weights_restored
from npft_lightning.quant.base import WeightQuantizer, fake_quantized
from npft_lightning.quant.rtn import (
    rtn_decode,
    rtn_encode,
    rtn_params,
    rtn_quantize,
    rtn_step,
)
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

from npft_lightning.core.topk import top_fraction_mask
from npft_lightning.quant.activation import (
    ActivationQuantizer,
    WeightActivationQuantizer,
    per_token_cuberoot,
    per_token_rtn,
)
from npft_lightning.quant.artefact import (
    load_quantized,
    quantized_size_report,
    save_quantized,
)
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.gptq import (
    GPTQ,
    GPTQCodes,
    gptq_encode_matrix,
    gptq_quantize_matrix,
)
from npft_lightning.quant.nonuniform import (
    NF,
    NF4,
    CubeRoot,
    KMeans,
    cuberoot_quantize,
    kmeans_decode,
    kmeans_encode,
    kmeans_quantize,
    nf4_quantize,
    nf_decode,
    nf_encode,
    nf_levels,
    nf_quantize,
)
from npft_lightning.quant.packing import pack_bits, unpack_bits
from npft_lightning.quant.requant import ReQuant
from npft_lightning.quant.sparse import DenseAndSparse

__all__ += [
    "GPTQ",
    "GPTQCodes",
    "gptq_encode_matrix",
    "gptq_quantize_matrix",
    "NF",
    "NF4",
    "CubeRoot",
    "KMeans",
    "cuberoot_quantize",
    "kmeans_decode",
    "kmeans_encode",
    "kmeans_quantize",
    "nf4_quantize",
    "nf_levels",
    "nf_decode",
    "nf_encode",
    "nf_quantize",
    "DenseAndSparse",
    "GGMLQuantizer",
    "ReQuant",
    "ActivationQuantizer",
    "WeightActivationQuantizer",
    "per_token_cuberoot",
    "per_token_rtn",
    "top_fraction_mask",
    "load_quantized",
    "pack_bits",
    "quantized_size_report",
    "save_quantized",
    "unpack_bits",
]
