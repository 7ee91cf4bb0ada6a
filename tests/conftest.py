"""Shared fixtures: tiny randomly initialised LLaMA-, OPT- and Gemma-3-shaped causal LMs (no download), and llama.cpp's own
quantizer (``ggml_quantize_chunk``) as the reference of the ggml twins."""

from __future__ import annotations

import ctypes
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 256


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg).eval()


def make_peaked_llama(hidden_size: int = 64, intermediate_size: int = 128, scale: float = 5.0) -> LlamaForCausalLM:
    """A tiny random llama with its matrices scaled up, so that attention (a wrong Q/K layout) and quantization errors
    show in the logits; widths that are multiples of 256 take llama.cpp's K-quants without a fallback."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return model


def make_tiny_opt(seed: int = 0) -> OPTForCausalLM:
    torch.manual_seed(seed)
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=64,
    )
    return OPTForCausalLM(cfg).eval()


def make_tiny_gemma3(seed: int = 0, peaked: bool = False) -> nn.Module:
    """conf/model/tiny-gemma3.yaml's model: two layers (a 32-token sliding window, then global attention).
    ``peaked``: its matrices scaled up and its norm weights random (Gemma's init leaves them 0, i.e. a scale of 1),
    so a wrong norm offset, window, rope base or query scale shows in the logits."""
    from npft_lightning.lm.models import TINY_DEFAULTS, build_tiny_model

    model = build_tiny_model(**{**TINY_DEFAULTS, "arch": "gemma3", "max_position_embeddings": 256, "seed": seed}).eval()
    if peaked:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.mul_(5.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


class QuadraticModel(nn.Module):
    """loss = ½ dᵀA d + bᵀd with d = vec(W) − w*; one Linear in ``layers`` so ``decoder_linears`` finds it."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w_star: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(w0.shape[1], w0.shape[0], bias=False, dtype=w0.dtype)])
        with torch.no_grad():
            self.layers[0].weight.copy_(w0)
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.register_buffer("w_star", w_star)

    def forward(self, input_ids=None, labels=None):
        d = self.layers[0].weight.reshape(-1) - self.w_star
        return SimpleNamespace(loss=0.5 * d @ (self.A @ d) + self.b @ d)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_opt() -> OPTForCausalLM:
    return make_tiny_opt()


@pytest.fixture
def tiny_gemma3() -> nn.Module:
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
