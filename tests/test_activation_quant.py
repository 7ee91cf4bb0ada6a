"""Activation fake quantization: per-token RTN and cube-root by hand, the hooks' life cycle, W/A configs."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    layer_input_and_output,
    make_datamodule,
    make_module,
    make_tiny_llama,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from npft_lightning.core.layers import decoder_linears
from npft_lightning.quant import RTN, CubeRoot
from npft_lightning.quant.activation import (
    ActivationQuantizer,
    WeightActivationQuantizer,
    per_token_cuberoot,
    per_token_rtn,
)
from npft_lightning.quant.base import fake_quantized
from npft_lightning.training.callbacks import FakeQuantValidation

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"


def test_per_token_rtn_by_hand():
    # 3 bits: levels -3..3; token 0: max|x| = 1.5 -> step 0.5; token 1: max|x| = 3 -> step 1.
    x = torch.tensor([[1.5, -0.6, 0.2, 0.0], [3.0, 1.4, -1.6, 0.4]])
    expected = torch.tensor([[1.5, -0.5, 0.0, 0.0], [3.0, 1.0, -2.0, 0.0]])
    assert torch.equal(per_token_rtn(x, 3), expected)
    # clip_ratio 0.5: step 0.25 for token 0, values beyond ±0.75 clamp there.
    assert torch.equal(per_token_rtn(x[:1], 3, clip_ratio=0.5), torch.tensor([[0.75, -0.5, 0.25, 0.0]]))


def test_per_token_rtn_is_per_token_and_keeps_shape_dtype_and_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, generator=g)
    x[0, 1] = 0  # an all-zero token stays zero
    q = per_token_rtn(x, 8)
    assert q.shape == x.shape and q.dtype == x.dtype
    assert torch.equal(q[0, 1], torch.zeros(16))
    # each token on its own grid: scaling one token scales its quantized values and no other token's
    y = x.clone()
    y[1, 2] *= 4
    qy = per_token_rtn(y, 8)
    assert torch.allclose(qy[1, 2], 4 * q[1, 2])
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 2] = False
    assert torch.equal(qy[mask], q[mask])
    # error at most half a step per element, step = max|x| / 127
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((q - x).abs() <= step / 2 + 1e-6).all()
    assert per_token_rtn(x.half(), 8).dtype == torch.float16


def test_per_token_cuberoot_by_hand():
    # cube roots [2, -1, 0.5, 0]; 3 bits, max 2 -> step 2/3; codes round([3, -1.5, 0.75, 0]) = [3, -2, 1, 0]
    x = torch.tensor([[8.0, -1.0, 0.125, 0.0]])
    f = torch.tensor([[2.0, -4 / 3, 2 / 3, 0.0]])
    assert torch.allclose(per_token_cuberoot(x, 3), f**3)
    # large values get coarse steps, small ones fine steps: relative error similar across magnitudes
    g = torch.Generator().manual_seed(1)
    y = torch.randn(64, 256, generator=g)
    small = y.abs() < 0.1
    assert (per_token_cuberoot(y, 8) - y)[small].abs().mean() < (per_token_rtn(y, 8) - y)[small].abs().mean()


def test_bad_activation_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="activation bits=9 is outside 2..8"):
        ActivationQuantizer(bits=9)
    with pytest.raises(ValueError, match="clip_ratio=1.5 must be in"):
        ActivationQuantizer(clip_ratio=1.5)
    with pytest.raises(ValueError, match="method='log' is not one of rtn, cuberoot"):
        ActivationQuantizer(method="log")


def test_fake_quant_of_a_layer_equals_quantizing_its_input_by_hand():
    model = make_tiny_llama()
    linears = decoder_linears(model)
    name = "model.layers.1.mlp.down_proj"
    layer = linears[name]
    clean_weight = layer.weight.detach().clone()
    quantizer = WeightActivationQuantizer(ActivationQuantizer(8), RTN(8))
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with layer_input_and_output(layer) as seen, torch.no_grad(), fake_quantized(model, linears, quantizer):
        model(input_ids=ids)
        expected = F.linear(per_token_rtn(seen["raw"], 8), RTN(8).quantize_weight(clean_weight), layer.bias)
        assert torch.allclose(seen["out"], expected, atol=1e-6)
        assert not torch.allclose(seen["out"], F.linear(seen["raw"], layer.weight), atol=1e-6)
    # after the block: no hooks left, the weight back bit for bit
    assert all(len(lin._forward_pre_hooks) == 0 for lin in linears.values())
    assert torch.equal(layer.weight, clean_weight)


def test_activation_only_quantizer_leaves_weights_alone():
    model = make_tiny_llama()
    linears = decoder_linears(model)
    before = {k: v.weight.detach().clone() for k, v in linears.items()}
    with fake_quantized(model, linears, WeightActivationQuantizer(ActivationQuantizer(4))):
        assert all(torch.equal(before[k], v.weight) for k, v in linears.items())
        assert all(len(v._forward_pre_hooks) == 1 for v in linears.values())
    assert all(len(v._forward_pre_hooks) == 0 for v in linears.values())


def test_hooks_are_removed_when_the_evaluation_fails():
    model = make_tiny_llama()
    linears = decoder_linears(model)
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized(model, linears, WeightActivationQuantizer(ActivationQuantizer(8), RTN(4))):
            raise RuntimeError("boom")
    assert all(len(v._forward_pre_hooks) == 0 for v in linears.values())


def test_w8a8_changes_ppl_less_than_w4a8_in_the_fake_quant_callback():
    module, dm = make_module(), make_datamodule()
    trainer = types.SimpleNamespace(datamodule=dm)
    weights = {k: v.detach().clone() for k, v in module.state_dict().items()}
    quantizers = {
        "w8a8": WeightActivationQuantizer(ActivationQuantizer(8), RTN(8)),
        "w4a8": WeightActivationQuantizer(ActivationQuantizer(8), RTN(4)),
        "w4a8_cuberoot": WeightActivationQuantizer(ActivationQuantizer(8, "cuberoot"), CubeRoot(4), name="w4a8_cuberoot"),
    }
    callback = FakeQuantValidation(quantizers)
    result = callback._evaluate_all(trainer, module)
    assert abs(result["w8a8"] - result["fp"]) < abs(result["w4a8"] - result["fp"])
    assert result["w4a8_cuberoot"] != result["w4a8"]
    after = module.state_dict()
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    assert all(len(v._forward_pre_hooks) == 0 for v in module.decoder_linears().values())


@pytest.mark.parametrize("config, name, wbits, abits, method", [
    ("w8a8", "w8a8", 8, 8, "rtn"), ("w4a8", "w4a8", 4, 8, "rtn"), ("w16a8", "w16a8", None, 8, "rtn"),
    ("w16a4", "w16a4", None, 4, "rtn"), ("w8a8_cuberoot", "w8a8_cuberoot", 8, 8, "cuberoot"),
    ("w4a8_cuberoot", "w4a8_cuberoot", 4, 8, "cuberoot"),
])
def test_weight_activation_configs(config, name, wbits, abits, method):
    cfg = OmegaConf.load(CONF / f"{config}.yaml")
    quantizer = instantiate(cfg[config])
    assert quantizer.name == name
    assert (quantizer.weight is None) == (wbits is None)
    if wbits is not None:
        assert quantizer.weight.bits == wbits
    assert quantizer.activation.bits == abits and quantizer.activation.method == method


def test_weight_only_w_a_configs_are_plain_weight_quantizers():
    for config, cls in (("w4a16", RTN), ("w4a16_cuberoot", CubeRoot)):
        quantizer = instantiate(OmegaConf.load(CONF / f"{config}.yaml")[config])
        assert type(quantizer) is cls and quantizer.bits == 4 and quantizer.name == config


def test_sensitivity_goes_to_a_weight_part_that_takes_it():
    from npft_lightning.quant import KMeans

    combined = WeightActivationQuantizer(ActivationQuantizer(8), KMeans(4))
    assert combined.sensitivity is None
    combined.sensitivity = {"a": torch.ones(1)}
    assert combined.weight.sensitivity is not None
    assert not hasattr(WeightActivationQuantizer(ActivationQuantizer(8), RTN(4)), "sensitivity")


def test_export_refuses_activation_quantization(tmp_path):
    from npft_lightning.quant.artefact import save_quantized

    model = make_tiny_llama()
    with pytest.raises(ValueError, match="WeightActivationQuantizer has no integer `bits` attribute; cannot pack its codes"):
        save_quantized(model, decoder_linears(model), WeightActivationQuantizer(ActivationQuantizer(8), RTN(4)), tmp_path / "x")
