"""Shared fixtures: tiny randomly initialised LLaMA-, OPT- and Gemma-3-shaped causal LMs (no download), and llama.cpp's own
quantizer (``ggml_quantize_chunk``) as the reference of the ggml twins. The plain helpers they use are in
helpers.py, which test files import; the test process is offline, as the entry points are."""

from __future__ import annotations

import ctypes
from pathlib import Path

from npft_lightning.core.env import set_offline_defaults

set_offline_defaults()  # before any Hugging Face library is imported, as train.py / eval.py do

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import VOCAB, make_tiny_gemma3, make_tiny_llama, make_tiny_opt  # noqa: E402
from transformers import LlamaForCausalLM, OPTForCausalLM  # noqa: E402


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_opt() -> OPTForCausalLM:
    return make_tiny_opt()


@pytest.fixture
def tiny_gemma3() -> torch.nn.Module:
    return make_tiny_gemma3()


@pytest.fixture
def token_windows() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, VOCAB, (4, 32), generator=g)


@pytest.fixture(scope="session")
def ggml_quantize():
    """``f(weight [rows, cols], ggml type name, imatrix [cols] or None) -> bytes [rows, row_size]``: what llama.cpp's
    quantizer writes for the rows of ``weight`` (``ggml_quantize_chunk`` of the installed llama-cpp-python's ggml)."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (make llamacpp) holds llama.cpp's quantizer")
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def quantize(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> np.ndarray:
        gtype = GGMLQuantizationType[qtype.upper()]
        x = np.ascontiguousarray(weight.detach().float().cpu().numpy())
        rows, cols = x.shape
        block, size = GGML_QUANT_SIZES[gtype]
        out = np.zeros((rows, cols // block * size), dtype=np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix.float().cpu().numpy())
        written = lib.ggml_quantize_chunk(int(gtype), x.ctypes.data, out.ctypes.data, 0, rows, cols,
                                          None if im is None else im.ctypes.data)
        assert written == out.size
        return out

    return quantize
