"""RTN math against hand-computed cases (the GPTQ reference grid)."""

import pytest
import torch

from npft_lightning.quant import RTN, rtn_encode, rtn_params, rtn_quantize, rtn_step


def test_hand_computed_asymmetric_4bit():
    # Row [-1, 0, 0.5, 2]: range [-1, 2], scale = 3/15 = 0.2, zero = round(1/0.2) = 5.
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = rtn_params(w, bits=4)
    assert scale.item() == pytest.approx(0.2)
    assert zero.item() == 5
    # 0.5/0.2 = 2.5 rounds half-to-even -> 2 -> code 7 -> 0.2*(7-5) = 0.4
    assert torch.allclose(rtn_quantize(w, 4), torch.tensor([[-1.0, 0.0, 0.4, 2.0]]), atol=1e-6)


def test_zero_forced_into_range():
    # All-positive row: xmin is clamped to 0, so 0 is exactly representable.
    w = torch.tensor([[1.0, 2.0, 3.0]])
    scale, zero = rtn_params(w, bits=2)
    assert scale.item() == pytest.approx(1.0) and zero.item() == 0
    assert torch.equal(rtn_quantize(torch.tensor([[0.0, 1.0, 3.0]]), 2), torch.tensor([[0.0, 1.0, 3.0]]))


def test_symmetric_grid():
    w = torch.tensor([[-3.0, 1.0, 0.0, 2.0]])
    scale, zero = rtn_params(w, bits=3, sym=True)
    # xmax = max(|-3|, 2) = 3 -> range [-3, 3], scale = 6/7, zero = 4
    assert scale.item() == pytest.approx(6 / 7) and zero.item() == 4


def test_all_zero_row_gets_unit_range():
    scale, zero = rtn_params(torch.zeros(1, 4), bits=4)
    assert scale.item() == pytest.approx(2 / 15)
    assert torch.equal(rtn_quantize(torch.zeros(1, 4), 4), torch.zeros(1, 4))


@pytest.mark.parametrize("bits,group", [(4, None), (3, None), (3, 32), (4, 128), (8, 16)])
def test_error_at_most_half_step_and_fixed_points(bits, group):
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    q = rtn_quantize(w, bits, group)
    step = rtn_step(w, bits, group)
    assert ((q - w).abs() <= step / 2 + 1e-6).all()
    # Quantizing twice changes nothing: grid points are fixed points.
    assert torch.allclose(rtn_quantize(q, bits, group), q, atol=1e-6)
    codes, _, _ = rtn_encode(w, bits, group)
    assert int(codes.max()) <= 2**bits - 1


def test_groups_are_independent():
    w = torch.cat([torch.full((1, 32), 0.01), torch.full((1, 32), 100.0)], dim=1)
    w[0, 0] = -0.01
    q = rtn_quantize(w, 3, group_size=32)
    assert (q[0, :32] - w[0, :32]).abs().max() < 0.01  # a small group keeps its own fine step


def test_bad_group_size_names_the_value():
    with pytest.raises(ValueError, match="group_size=48"):
        rtn_quantize(torch.randn(2, 64), 4, 48)
    with pytest.raises(ValueError, match="bits=9"):
        RTN(bits=9)


def test_rtn_names():
    assert RTN(4).name == "rtn4"
    assert RTN(3, 32).name == "rtn3_g32"
    assert RTN(4, 32, sym=True).name == "rtn4_sym_g32"


@pytest.mark.parametrize("group_size,sym", [(None, False), (16, False), (16, True), (None, True)])
def test_error_at_indices_is_the_full_error_there_bit_for_bit(group_size, sym):
    from npft_lightning.quant.rtn import rtn_error, rtn_error_at

    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 64, generator=g) * torch.rand(24, 1, generator=g)
    w[5] = 0.0  # an all-zero row takes the [-1, 1] range
    idx = torch.randperm(w.numel(), generator=g)[:300]
    full = rtn_error(w, 4, group_size, sym).reshape(-1)
    assert torch.equal(rtn_error_at(w, idx, 4, group_size, sym), full[idx])
    assert torch.equal(rtn_error_at(w, idx.to(torch.int32), 3, group_size, sym), rtn_error(w, 3, group_size, sym).reshape(-1)[idx])
