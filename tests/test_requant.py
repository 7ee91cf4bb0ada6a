"""ReQuant: outliers + PQI-significant weights detached to a full-precision sparse part around any base quantizer."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import QuadraticModel, assert_export_exact
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn

from npft_lightning.core.gradients import pqi_along
from npft_lightning.core.layers import decoder_linears
from npft_lightning.quant import (
    GPTQ,
    NF4,
    RTN,
    KMeans,
    ReQuant,
    WeightQuantizer,
    fake_quantized,
    quantized_size_report,
    save_quantized,
)
from npft_lightning.quant.artefact import quantizer_config, quantizer_from_config
from npft_lightning.quant.packing import encoding_size
from npft_lightning.quant.requant import allocate_outliers, detach_steps, lower_hull

ROOT = Path(__file__).resolve().parents[1]


def _requant(base: WeightQuantizer | None = None, **kw) -> ReQuant:
    settings = dict(outlier_ratio=1.0, significant_ratio=1.0, significant_step=0.5, pqi_intervals=2, progress=False)
    return ReQuant(base or RTN(3), **{**settings, **kw})


def _encode(model: nn.Module, quantizer: ReQuant, windows: Tensor) -> tuple[dict, dict[str, Tensor]]:
    originals = {n: lin.weight.detach().clone() for n, lin in decoder_linears(model).items()}
    fields = quantizer.encode_model(model, decoder_linears(model), windows)
    assert all(torch.equal(lin.weight, originals[n]) for n, lin in decoder_linears(model).items())  # model untouched
    return fields, originals


# ---------------------------------------------------------------------------------------------
# the sparse part
# ---------------------------------------------------------------------------------------------


def test_sparse_part_holds_exactly_the_detached_weights(tiny_llama, token_windows) -> None:
    quantizer = _requant()
    fields, originals = _encode(tiny_llama, quantizer, token_windows)
    n = sum(w.numel() for w in originals.values())
    report = quantizer.last_report
    assert sum(report["outliers"].values()) == round(n * 0.01)
    total = round(n * 0.01)
    assert report["significant_per_step"] == [round(total / 2), total - round(total / 2)]
    assert len(set(report["outliers"].values())) > 1  # the per-layer ratios adapt
    for name, w in originals.items():
        parts = quantizer.last_detached[name]
        outliers, steps = parts["outliers"], parts["significant"]
        everything = torch.cat([outliers, *steps])
        assert everything.unique().numel() == everything.numel()  # no weight detached twice
        assert torch.equal(fields[name]["sparse_index"], everything.sort().values)
        assert torch.equal(fields[name]["sparse_value"], w.flatten()[fields[name]["sparse_index"]])
        # outliers are the largest |w| of their layer
        k = outliers.numel()
        if k:
            assert set(outliers.tolist()) == set(w.abs().flatten().topk(k).indices.tolist())


@pytest.mark.parametrize("base", [RTN(3), RTN(4, group_size=32), KMeans(3, iters=5), NF4(block_size=32)], ids=lambda q: q.name)
def test_dense_plus_sparse_reconstructs_w_bit_exactly(base, tiny_llama, token_windows) -> None:
    quantizer = _requant(base)
    fields, originals = _encode(tiny_llama, quantizer, token_windows)
    for name, w in originals.items():
        decoded = quantizer.decode_weight(fields[name])
        index = fields[name]["sparse_index"]
        assert torch.equal(decoded.flatten()[index], w.flatten()[index])  # bit-exact at the detached positions
        dense = base.decode_weight({k: v for k, v in fields[name].items() if not k.startswith("sparse_")})
        keep = torch.ones(w.numel(), dtype=torch.bool)
        keep[index] = False
        assert torch.equal(decoded.flatten()[keep], dense.flatten()[keep])  # the base's codes everywhere else


def test_outliers_shrink_the_dense_range(tiny_llama, token_windows) -> None:
    """Re-quantized without its outliers, a layer's dense part has a finer RTN grid."""
    quantizer = _requant(significant_ratio=0.0)
    fields, originals = _encode(tiny_llama, quantizer, token_windows)
    name = max(quantizer.last_report["outliers"], key=quantizer.last_report["outliers"].get)
    plain = RTN(3).encode_weight(originals[name])
    assert (fields[name]["scale"] <= plain["scale"] + 1e-7).all() and (fields[name]["scale"] < plain["scale"]).any()


# ---------------------------------------------------------------------------------------------
# the outlier allocation (Algorithm 1)
# ---------------------------------------------------------------------------------------------


def test_lower_hull_and_allocation() -> None:
    assert lower_hull([(0, 10.0), (1, 9.5), (2, 6.0), (4, 5.0), (2, 7.0)]) == [(0, 10.0), (2, 6.0), (4, 5.0)]
    curves = {"a": [(0, 10.0), (2, 6.0), (4, 5.0)], "b": [(0, 4.0), (4, 1.0), (8, 0.5)]}
    # gains per outlier: a 2.0 then 0.5; b 0.75 then 0.125 -> a's first segment, then b's first
    assert allocate_outliers(curves, 2) == {"a": 2, "b": 0}
    assert allocate_outliers(curves, 5) == {"a": 2, "b": 3}  # the last segment cut short
    assert allocate_outliers(curves, 8) == {"a": 4, "b": 4}
    assert allocate_outliers(curves, 12) == {"a": 4, "b": 8}
    assert allocate_outliers(curves, 20) == {"a": 4, "b": 8}  # no room left anywhere
    with pytest.raises(ValueError, match="include the count 0"):
        allocate_outliers({"a": [(1, 1.0)]}, 1)


# ---------------------------------------------------------------------------------------------
# step-wise detach (Algorithm 2)
# ---------------------------------------------------------------------------------------------


class FixedError(WeightQuantizer):
    """Q(W) = W + a fixed error pattern (a stored form of float values), to steer the PQI by hand."""

    name = "fixed"

    def __init__(self, error: Tensor):
        self.error = error

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        return {"value": weight.float() + self.error}

    def decode_weight(self, payload) -> Tensor:
        return payload["value"]


def test_stepwise_detach_recomputes_pqi_between_steps() -> None:
    """loss = ½ dᵀAd with weights 1 and 2 coupled: recovering weight 1 first removes most of weight 2's PQI,
    so the second step takes weight 3, where a one-shot top-2 takes weights 1 and 2."""
    h = 0.9
    A = torch.eye(4, dtype=torch.float64)
    A[0, 1] = A[1, 0] = h
    w0 = torch.tensor([[0.5, -0.25, 1.0, 2.0]], dtype=torch.float64)
    delta = torch.tensor([[1.5, 1.0, 1.2, 0.1]], dtype=torch.float64)
    model = QuadraticModel(A, torch.zeros(4, dtype=torch.float64), w0.reshape(-1).clone(), w0)
    windows = torch.zeros(1, 2, dtype=torch.long)
    linears = decoder_linears(model)
    name = next(iter(linears))

    one_shot = pqi_along(model, linears, {name: delta.float().clone()}, windows, intervals=1, progress=False)[name]
    # midpoint PQI of a quadratic: |Δ_i (AΔ)_i| / 2
    assert torch.allclose(one_shot.double(), (delta.reshape(-1) * (A @ delta.reshape(-1))).abs().reshape(1, 4) / 2)
    assert one_shot.flatten().topk(2).indices.sort().values.tolist() == [0, 1]

    quantizer = ReQuant(FixedError(delta), outlier_ratio=0, significant_ratio=50, significant_step=25, pqi_intervals=1, progress=False)
    calls = []
    import npft_lightning.core.gradients as sensitivity

    original = sensitivity.pqi_along

    def counted(*args, **kwargs):
        calls.append(args[2][name].clone())  # the error of this step's path
        return original(*args, **kwargs)

    sensitivity.pqi_along = counted
    try:
        fields = quantizer.encode_model(model, linears, windows)
    finally:
        sensitivity.pqi_along = original
    steps = quantizer.last_detached[name]["significant"]
    assert [s.tolist() for s in steps] == [[0], [2]]
    assert len(calls) == 2 and calls[1][0, 0] == 0 and calls[1][0, 1] != 0  # step 2 scored the updated model
    assert fields[name]["sparse_index"].tolist() == [0, 2]


def test_detach_steps() -> None:
    assert detach_steps(0.05, 0.025) == 2
    assert detach_steps(0.5, 0.25) == 2
    assert detach_steps(0.05, 0.05) == 1
    assert detach_steps(0.05, 0.0125) == 4
    assert detach_steps(0.0, 0.03) == 0
    assert detach_steps(0.5, None) == 1


# ---------------------------------------------------------------------------------------------
# export and effective bits
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda: _requant(RTN(4)), lambda: _requant(GPTQ(3, group_size=32, act_order=False))],
                         ids=["rtn4", "gptq3_g32"])
def test_export_load_bit_exact_and_effective_bits(make, tiny_llama, token_windows, tmp_path) -> None:
    quantizer = make()
    report = assert_export_exact(tiny_llama, quantizer, tmp_path / "rq", token_windows[:2], calibration=token_windows)
    assert report["sparse_bytes"] > 0
    # the effective bits counted while fake-quantizing match the bytes the artefact stores
    model = copy.deepcopy(tiny_llama)
    linears = decoder_linears(model)
    sizes: dict = {}
    with fake_quantized(model, linears, quantizer, calibration=token_windows, sizes=sizes):
        pass
    for key in ("codes_bytes", "meta_bytes", "sparse_bytes", "linear_bytes"):
        assert sizes[key] == report[key], key
    assert sizes["bits_per_weight"] == pytest.approx(report["linear_bits_per_weight"], rel=1e-12)
    # by hand: 4- or 3-bit codes, fp32 scales + packed zero points per row/group, int32 position + fp32 value per sparse entry
    n = sizes["linear_weights"]
    entries = round(n * 0.01) + round(n * 0.01)
    assert sizes["sparse_entries"] == entries and sizes["sparse_bytes"] == entries * 8
    bits = quantizer.base.bits
    assert sizes["codes_bytes"] == sum(math.ceil(lin.weight.numel() * bits / 8) for lin in linears.values())
    assert sizes["bits_per_weight"] == pytest.approx(8 * (sizes["codes_bytes"] + sizes["meta_bytes"] + entries * 8) / n)
    assert sizes["bits_per_weight_16bit_floats"] < sizes["bits_per_weight"]


def test_effective_bits_of_plain_quantizers(tiny_llama, tmp_path) -> None:
    """The same count for a quantizer without a sparse part (what eval.py reports for every row)."""
    quantizer = RTN(4, group_size=32)
    linears = decoder_linears(tiny_llama)
    fields = quantizer.encode_model(tiny_llama, linears)
    n = sum(lin.weight.numel() for lin in linears.values())
    sizes = encoding_size(fields, 4, n)
    save_quantized(tiny_llama, linears, quantizer, tmp_path / "a")
    assert sizes["bits_per_weight"] == quantized_size_report(tmp_path / "a")["linear_bits_per_weight"]
    assert sizes["bits_per_weight"] == pytest.approx(4 + (32 + 4) / 32)  # fp32 scale + 4-bit zero per 32 weights
    assert sizes["sparse_entries"] == 0


def test_quantizer_config_round_trip() -> None:
    for q in [_requant(KMeans(3, 7)), ReQuant(GPTQ(3, 32), 0, 0.5, 0.25, calibration_windows=8, name="x")]:
        rebuilt = quantizer_from_config(quantizer_config(q))
        assert type(rebuilt) is ReQuant and repr(rebuilt) == repr(q)


def test_configs_instantiate() -> None:
    paths = sorted((ROOT / "conf" / "quant").glob("requant_*.yaml"))
    assert {p.stem for p in paths} >= {"requant_rtn4", "requant_rtn3_g32", "requant_gptq4", "requant_gptq3_g32", "requant_kmeans3",
                                       "requant_nf4", "requant_rtn4_ro0", "requant_gptq3_g32_ro0"}
    for path in paths:
        (key, cfg), = OmegaConf.load(path).items()
        q = instantiate(cfg)
        assert q.name == key == path.stem
        assert (q.outlier_ratio, q.significant_ratio, q.steps) in ((0.45, 0.05, 2), (0.0, 0.5, 2))


# ---------------------------------------------------------------------------------------------
# bad input: one clear line each
# ---------------------------------------------------------------------------------------------


class WholeModelOnly(WeightQuantizer):
    """A model-level quantizer with a stored form but no RTN grid."""

    needs_calibration = True
    name = "opaque"

    def encode_model(self, model, linears, calibration=None):
        return {n: {"value": lin.weight.float()} for n, lin in linears.items()}

    def decode_weight(self, payload):
        return payload["value"]


@pytest.mark.parametrize("kwargs,message", [
    ({"outlier_ratio": -0.1}, "requant outlier_ratio=-0.1 is outside [0, 100)"),
    ({"outlier_ratio": 100}, "requant outlier_ratio=100 is outside [0, 100)"),
    ({"significant_ratio": float("nan")}, "requant significant_ratio=nan is outside [0, 100)"),
    ({"outlier_ratio": 60, "significant_ratio": 40, "significant_step": 20}, "leaves no dense part"),
    ({"significant_ratio": 0.05, "significant_step": 0.03}, "requant significant_step=0.03 does not divide significant_ratio=0.05 into whole steps"),
    ({"significant_ratio": 0.05, "significant_step": 0.1}, "does not divide"),
    ({"base": WholeModelOnly()}, "requant base opaque quantizes whole models and has no RTN grid"),
    ({"base": ReQuant(RTN(4))}, "must be a plain weight-only quantizer"),
    ({"outlier_candidates": [0.5]}, "requant outlier_candidates=[0.5] must be factors >= 0"),
    ({"pqi_intervals": 0}, "requant pqi_intervals=0 must be an integer >= 1"),
])
def test_bad_input_one_line(kwargs, message) -> None:
    kwargs = {"base": RTN(4), **kwargs}
    with pytest.raises(ValueError) as err:
        ReQuant(**kwargs)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_whole_model_base_without_outliers_needs_no_grid(tiny_llama, token_windows) -> None:
    quantizer = ReQuant(WholeModelOnly(), outlier_ratio=0, significant_ratio=1.0, significant_step=1.0, pqi_intervals=1, progress=False)
    fields, originals = _encode(tiny_llama, quantizer, token_windows)
    assert sum(f["sparse_index"].numel() for f in fields.values()) == round(sum(w.numel() for w in originals.values()) * 0.01)


def test_needs_calibration_windows(tiny_llama) -> None:
    with pytest.raises(ValueError, match="needs calibration token windows"):
        _requant().quantize_model(tiny_llama, decoder_linears(tiny_llama), None)


def test_gptq_keeps_sparse_entries_exact_and_compensates_for_them(tiny_llama, token_windows) -> None:
    """GPTQ told which entries the sparse part holds: they leave the grid ranges and their exact values count
    in the error compensation (lower output error than quantizing the zeroed matrix and writing them back);
    in a model, the later blocks calibrate on the dense + sparse weights."""
    from npft_lightning.quant.gptq import gptq_encode_matrix
    from npft_lightning.quant.rtn import rtn_decode, rtn_params

    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    x = torch.randn(512, 64, generator=g) @ (torch.eye(64) + 0.5 * torch.randn(64, 64, generator=g))  # correlated inputs
    h = 2 * x.T @ x / x.shape[0]
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.view(-1)[w.abs().flatten().topk(40).indices] = True
    assert torch.equal(gptq_encode_matrix(w, h, 3, keep=torch.zeros_like(keep)).codes, gptq_encode_matrix(w, h, 3).codes)

    def output_error(enc) -> float:
        group = None if enc.scale.shape[1] == 1 else w.shape[1] // enc.scale.shape[1]
        q = torch.where(keep, w, rtn_decode(enc.codes, enc.scale, enc.zero, group).float())
        return float(((x @ (q - w).T) ** 2).sum())

    assert torch.equal(gptq_encode_matrix(w, h, 3, keep=keep).scale, rtn_params(w.masked_fill(keep, 0), 3)[0])
    for group in (None, 16):
        for act_order in (True, False):
            kept = gptq_encode_matrix(w, h, 3, group, act_order=act_order, keep=keep)
            zeroed = gptq_encode_matrix(w.masked_fill(keep, 0), h, 3, group, act_order=act_order)
            assert output_error(kept) < output_error(zeroed), (group, act_order)

    gptq = GPTQ(3, group_size=32)
    linears = decoder_linears(tiny_llama)
    gptq.kept = {name: lin.weight.abs() > lin.weight.abs().quantile(0.99) for name, lin in linears.items()}
    originals = {name: lin.weight.clone() for name, lin in linears.items()}
    seen = {}

    def record(module, args):
        seen.setdefault("w0", linears["model.layers.0.mlp.down_proj"].weight.clone())

    hook = linears["model.layers.1.self_attn.q_proj"].register_forward_pre_hook(record)
    try:
        gptq.quantize_model(tiny_llama, linears, token_windows)
    finally:
        hook.remove()
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(seen["w0"][gptq.kept[down]], originals[down][gptq.kept[down]])  # block 1 calibrated on exact kept values
    for name, lin in linears.items():
        assert torch.equal(lin.weight[gptq.kept[name]], originals[name][gptq.kept[name]])
