"""GPTQ: matrix-level optimality/grid properties and the block-by-block model pass on tiny LLaMA/OPT."""

from __future__ import annotations

import pytest
import torch
from helpers import last_block_output
from torch import Tensor, nn

from npft_lightning.core.layers import decoder_linears
from npft_lightning.quant import RTN, fake_quantized
from npft_lightning.quant.gptq import (
    GPTQ,
    HessianAccumulator,
    gptq_encode_matrix,
    gptq_quantize_matrix,
    sequential_stages,
)
from npft_lightning.quant.rtn import rtn_decode, rtn_params, rtn_quantize


def _problem(out: int = 48, inp: int = 96, n: int = 1024, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A weight, correlated inputs X = Z @ M (so the Hessian is far from diagonal) and H = 2/n XᵀX."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + 0.3 * torch.eye(inp)
    x = torch.randn(n, inp, generator=g) @ mix
    return w, x, 2 * x.T @ x / n


def _output_error(x: Tensor, w: Tensor, q: Tensor) -> float:
    return float((x @ (w - q).T).norm())


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_output_error_below_rtn(bits: int, group_size: int | None, act_order: bool) -> None:
    w, x, h = _problem()
    q = gptq_quantize_matrix(w, h, bits, group_size, act_order=act_order)
    assert q.dtype == torch.float32 and q.shape == w.shape
    assert _output_error(x, w, q) < 0.9 * _output_error(x, w, rtn_quantize(w, bits, group_size))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_per_channel_values_are_rtn_grid_points(act_order: bool, sym: bool) -> None:
    w, _, h = _problem()
    bits = 3
    q = gptq_quantize_matrix(w, h, bits, sym=sym, act_order=act_order)
    scale, zero = rtn_params(w, bits, None, sym)  # the RTN grid of each row
    codes = torch.round(q / scale + zero)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert torch.equal(q, scale * (codes - zero))  # bit-exact grid points
    assert all(len(row.unique()) <= 2**bits for row in q)


def test_static_groups_use_rtn_group_grid() -> None:
    w, _, h = _problem()
    q = gptq_quantize_matrix(w, h, 3, group_size=16, act_order=True, static_groups=True)
    scale, zero = rtn_params(w, 3, 16)
    s, z = scale.repeat_interleave(16, 1), zero.repeat_interleave(16, 1)
    codes = torch.round(q / s + z)
    assert codes.min() >= 0 and codes.max() <= 7
    assert torch.equal(q, s * (codes - z))


@pytest.mark.parametrize("act_order", [False, True])
def test_encode_decodes_to_quantized_weight(act_order: bool) -> None:
    w, _, h = _problem()
    enc = gptq_encode_matrix(w, h, 4, group_size=32, act_order=act_order)
    assert enc.codes.dtype == torch.uint8 and enc.scale.shape == (48, 3) and enc.zero.shape == (48, 3)
    assert (enc.perm is not None) == act_order
    q = gptq_quantize_matrix(w, h, 4, group_size=32, act_order=act_order)
    assert torch.equal(rtn_decode(enc.codes, enc.scale, enc.zero, 32), q)


@pytest.mark.parametrize("group_size,act_order", [(None, False), (8, False), (8, True), (24, True)])
def test_lazy_block_updates_are_exact(group_size: int | None, act_order: bool) -> None:
    """Lazy batching only reorders the same updates: every block size gives the same codes."""
    w, _, h = _problem(out=16, inp=48, n=256)
    ref = gptq_encode_matrix(w, h, 3, group_size, act_order=act_order, block_size=1).codes
    for block_size in (5, 16, 128):
        assert torch.equal(gptq_encode_matrix(w, h, 3, group_size, act_order=act_order, block_size=block_size).codes, ref)


def _obq_reference(w: Tensor, h: Tensor, bits: int, percdamp: float = 0.01) -> Tensor:
    """Textbook OBQ-ordered-by-column GPTQ with an explicit inverse (no Cholesky, no blocks), per channel."""
    w, h = w.double().clone(), h.double().clone()
    h += percdamp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.inv(h)
    scale, zero = (t.double()[:, 0] for t in rtn_params(w, bits))
    q = torch.zeros_like(w)
    for i in range(w.shape[1]):
        q[:, i] = scale * (torch.clamp(torch.round(w[:, i] / scale) + zero, 0, 2**bits - 1) - zero)
        err = (w[:, i] - q[:, i]) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        hinv -= hinv[:, i : i + 1] @ hinv[i : i + 1, :] / hinv[i, i]  # drop column i from the inverse
    return q.float()


def test_matches_explicit_inverse_reference() -> None:
    w, _, h = _problem(out=12, inp=24, n=200)
    ours = gptq_quantize_matrix(w, h, 3, act_order=False, block_size=8)
    assert torch.allclose(ours, _obq_reference(w, h, 3), atol=1e-6)


def test_dead_columns() -> None:
    w, x, _ = _problem()
    x[:, [3, 40]] = 0
    h = 2 * x.T @ x / x.shape[0]
    for act_order in (False, True):
        q = gptq_quantize_matrix(w, h, 4, group_size=32, act_order=act_order)
        assert torch.isfinite(q).all()
        assert (q[:, [3, 40]] == 0).all()  # they never affect the output: zeroed


def test_hessian_accumulator_is_running_mean() -> None:
    acc = HessianAccumulator(8, torch.device("cpu"))
    xs = [torch.randn(2, 5, 8), torch.randn(3, 8)]
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 8) for x in xs]).double()
    assert acc.count == 13
    assert torch.allclose(acc.hessian(), 2 * flat.T @ flat / 13)


def test_sequential_stages() -> None:
    llama = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    assert [[n.rsplit(".", 1)[1] for n in s] for s in sequential_stages(llama[::-1])] == [
        ["v_proj", "k_proj", "q_proj"], ["o_proj"], ["up_proj", "gate_proj"], ["down_proj"]]
    opt = [f"model.decoder.layers.1.{p}" for p in ("fc2", "fc1", "self_attn.out_proj", "self_attn.q_proj", "x.odd")]
    assert [[n.rsplit(".", 1)[1] for n in s] for s in sequential_stages(opt)] == [
        ["q_proj"], ["out_proj"], ["fc1"], ["fc2"], ["odd"]]


def test_names() -> None:
    assert GPTQ().name == "gptq4"
    assert GPTQ(3, group_size=32).name == "gptq3_g32"
    assert GPTQ(4, act_order=False, true_sequential=False).name == "gptq4_noact_noseq"
    assert GPTQ.needs_calibration and GPTQ().needs_calibration
    with pytest.raises(ValueError, match=r"quant bits=1 is outside 2\.\.8"):
        GPTQ(bits=1)


# ---------------------------------------------------------------------------------------------
# whole-model pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_opt"])
def test_quantize_model(model_name: str, request: pytest.FixtureRequest, token_windows: Tensor) -> None:
    model = request.getfixturevalue(model_name)
    linears = decoder_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = last_block_output(model, token_windows)
    linear_keys = {f"{name}.weight" for name in linears}

    errors = {}
    for quantizer in (RTN(3), GPTQ(3, batch_size=3), GPTQ(3, act_order=False, true_sequential=False)):
        with fake_quantized(model, linears, quantizer, calibration=token_windows):
            after = model.state_dict()
            changed = {k for k in before if not torch.equal(before[k], after[k])}
            assert changed == linear_keys  # every decoder linear weight, nothing else (biases, norms, embeddings)
            for lin in linears.values():
                assert all(len(row.unique()) <= 8 for row in lin.weight)
            errors[quantizer.name] = float((last_block_output(model, token_windows) - reference).norm())
        # fake_quantized restores the weights bit for bit
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    assert errors["gptq3"] < errors["rtn3"]
    assert errors["gptq3_noact_noseq"] < errors["rtn3"]


def test_quantize_model_through_peft(tiny_llama: nn.Module, token_windows: Tensor) -> None:
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    linears = decoder_linears(model)
    assert len(linears) == 14
    model.train()
    before = {k: lin.weight.clone() for k, lin in linears.items()}
    with model.disable_adapter():
        GPTQ(4, group_size=32).quantize_model(model, linears, token_windows)
    assert model.training  # mode restored
    assert all(not torch.equal(before[k], lin.weight) for k, lin in linears.items())


def test_needs_calibration(tiny_opt: nn.Module) -> None:
    with pytest.raises(ValueError, match="calibration"):
        GPTQ().quantize_model(tiny_opt, decoder_linears(tiny_opt), None)
    with pytest.raises(NotImplementedError, match="GPTQ needs calibration activations"):
        GPTQ().quantize_weight(torch.zeros(2, 2))


@pytest.mark.parametrize("true_sequential", [True, False])
def test_linears_reading_one_input_share_its_product(tiny_llama: nn.Module, token_windows: Tensor, monkeypatch, true_sequential: bool) -> None:
    """q, k, v (gate, up) read the same tensor: its x xᵀ is computed once per batch, and every Hessian equals the one
    accumulated from that linear's own inputs alone, bit for bit."""
    from npft_lightning.core.layers import block_index, decoder_blocks
    from npft_lightning.quant.gptq import capture_block_inputs

    _, blocks = decoder_blocks(tiny_llama)
    inputs = capture_block_inputs(tiny_llama, blocks[0], token_windows, 3)
    linears = {n: lin for n, lin in decoder_linears(tiny_llama).items() if block_index(n) == 0}
    own = {name: HessianAccumulator(lin.in_features, lin.weight.device) for name, lin in linears.items()}
    handles = [lin.register_forward_hook(lambda mod, args, out, name=name: own[name].add(args[0])) for name, lin in linears.items()]
    with torch.no_grad():
        for hidden, args, kwargs in inputs:
            blocks[0](hidden, *args, **kwargs)
    for handle in handles:
        handle.remove()

    products = []
    plain_product = HessianAccumulator.product
    monkeypatch.setattr(HessianAccumulator, "product", staticmethod(lambda x, device: products.append(x) or plain_product(x, device)))
    stages = sequential_stages(list(linears)) if true_sequential else [list(linears)]
    quantizer = GPTQ(4, true_sequential=true_sequential)
    with torch.no_grad():
        hessians = {name: h for stage in stages for name, h in quantizer._hessians(blocks[0], inputs, {n: linears[n] for n in stage}).items()}
    assert set(hessians) == set(linears)
    assert all(torch.equal(hessians[name], own[name].hessian()) for name in linears)
    # per batch: one product for q/k/v, one for o, one for gate/up, one for down: 4 of 7
    assert len(products) == 4 * len(inputs) and len(linears) == 7
