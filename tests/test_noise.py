"""Noise distributions, seeding, the scale schedule, and in-place apply/restore."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import make_tiny_llama

from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.noise import (
    GaussianNoise,
    NoNoise,
    NPFTPaperNoise,
    UniformStepNoise,
    apply_noise,
    noise_generator,
    restore_noise,
    scale_schedule,
)
from npft_lightning.npft.outliers import magnitude_scores, select_outliers
from npft_lightning.quant import RTN, rtn_params


def _weight(rows: int = 8, cols: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


def _flat(rows_cols: list[tuple[int, int]], cols: int) -> torch.Tensor:
    return torch.tensor(sorted(r * cols + c for r, c in rows_cols))


# ------------------------------------------------------------------ seeding


def test_generator_is_deterministic_per_triple():
    draw = lambda *t: torch.rand(8, generator=noise_generator(*t))  # noqa: E731
    assert torch.equal(draw(0, 1, 2), draw(0, 1, 2))
    assert not torch.equal(draw(0, 1, 2), draw(0, 1, 3))
    assert not torch.equal(draw(0, 1, 2), draw(0, 2, 2))
    assert not torch.equal(draw(0, 1, 2), draw(1, 1, 2))
    assert not torch.equal(draw(0, -1, -1), draw(0, -1, 0))
    assert noise_generator(0, 1, 2).device.type == "cpu"


# ------------------------------------------------------------------ npft_paper


def test_npft_paper_matches_row_loop_reference():
    w = _weight()
    idx = _flat([(0, 1), (0, 3), (0, 5), (0, 7), (2, 4), (5, 0), (5, 15)], 16)
    delta = NPFTPaperNoise(scale=1.0).sample(w, idx, noise_generator(7))
    assert delta.dtype == torch.float32 and delta.shape == (7,)

    # the reference code, row by row, fed the same uniform stream (one draw per outlier, index order)
    r = torch.rand(7, generator=noise_generator(7), dtype=torch.float64)
    rows = idx // 16
    expected = torch.empty(7, dtype=torch.float64)
    for row in rows.unique():
        sel = rows == row
        v = w.reshape(-1)[idx[sel]].double()
        u = v.min() + (v.max() - v.min()) * r[sel]
        expected[sel] = u - u.mean()
    torch.testing.assert_close(delta, expected.float())


def test_npft_paper_zero_row_sums_bounds_and_single_outliers():
    w = _weight(32, 64)
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(w.numel(), generator=g)[:300].sort().values
    rows = idx // 64
    noise = NPFTPaperNoise(scale=1.5)
    for step in range(5):
        delta = noise.sample(w, idx, noise_generator(0, 0, step)).double()
        for row in rows.unique():
            sel = rows == row
            v = w.reshape(-1)[idx[sel]].double()
            assert abs(delta[sel].sum().item()) < 1e-6  # zero-mean within the row
            assert delta[sel].abs().max() <= 1.5 * (v.max() - v.min()) + 1e-6  # u and its mean lie in [min, max]
            if sel.sum() == 1:
                assert delta[sel].item() == 0.0
    # scale multiplies the very same draw
    d1 = NPFTPaperNoise(scale=1.0).sample(w, idx, noise_generator(3))
    d2 = NPFTPaperNoise(scale=2.0).sample(w, idx, noise_generator(3))
    torch.testing.assert_close(d2, 2 * d1)


def test_npft_paper_per_weight_and_midpoint_variants():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(0.01, 0.02, 32)  # row 0: a narrow range
    w[1, :2] = torch.tensor([-1.0, 1.0])  # row 1: a wide one
    idx = torch.cat([torch.arange(32), torch.tensor([64, 65])])
    per_row = NPFTPaperNoise(per_channel=True).sample(w, idx, noise_generator(0))
    per_matrix = NPFTPaperNoise(per_channel=False).sample(w, idx, noise_generator(0))
    assert per_row[:32].abs().max() <= 0.01 + 1e-7
    assert per_matrix[:32].abs().max() > 0.1  # the matrix-wide range [-1, 1] is used
    assert abs(per_matrix[:32].sum().item()) < 1e-5  # still centred per row

    # midpoint centring: single outliers (row 0 col 1, row 1 col 1) are perturbed too, zero-mean in expectation
    singles = torch.tensor([1, 65])
    assert torch.equal(NPFTPaperNoise(per_channel=False).sample(w, singles, noise_generator(0)), torch.zeros(2))
    mid = NPFTPaperNoise(center="midpoint", per_channel=False)
    draws = torch.stack([mid.sample(w, singles, noise_generator(0, 0, s)) for s in range(2000)]).double()
    assert (draws != 0).all()
    half_range = (w[1, 1] - w[0, 1]).item() / 2
    assert draws.abs().max() <= half_range + 1e-6
    assert abs(draws.mean().item()) < 4 * half_range / math.sqrt(3 * draws.numel())
    assert mid.sample(w, torch.tensor([5]), noise_generator(0)).item() == 0.0  # one value: the range is a point
    with pytest.raises(ValueError, match="center"):
        NPFTPaperNoise(center="median")


# ------------------------------------------------------------------ uniform_step / gaussian


@pytest.mark.parametrize("group_size,sym", [(None, False), (32, False), (None, True)])
def test_uniform_step_uses_rtn_step(group_size, sym):
    w = _weight(16, 64)
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:100].sort().values
    noise = UniformStepNoise(scale=1.0, bits=3, group_size=group_size, sym=sym)
    expected = RTN(bits=3, group_size=group_size, sym=sym).step(w).reshape(-1)[idx]
    torch.testing.assert_close(noise.step(w, idx), expected)
    delta = noise.sample(w, idx, noise_generator(0))
    assert torch.all(delta.abs() <= expected / 2)

    per_tensor = UniformStepNoise(bits=3, group_size=group_size, sym=sym, per_channel=False)
    scale, _ = rtn_params(w.reshape(1, -1), 3, None, sym)
    torch.testing.assert_close(per_tensor.step(w, idx), scale.reshape(1).expand(100))


def test_uniform_step_zero_mean_and_variance():
    w = _weight(64, 128)
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:2000].sort().values
    noise = UniformStepNoise(scale=0.5, bits=4)
    step = noise.step(w, idx)
    z = torch.stack([noise.sample(w, idx, noise_generator(0, 0, s)) / (0.5 * step) for s in range(50)]).double()
    n = z.numel()  # 100k samples of U[-1/2, 1/2]
    assert abs(z.mean().item()) < 4 * math.sqrt(1 / 12 / n)
    assert abs(z.var().item() - 1 / 12) < 1e-3  # var of s·Δ·U is s²Δ²/12 (±4 standard errors)


def test_gaussian_zero_mean_and_row_std():
    w = _weight(64, 128) * torch.linspace(0.1, 2.0, 64)[:, None]  # rows of different spread
    idx = torch.randperm(w.numel(), generator=torch.Generator().manual_seed(0))[:2000].sort().values
    sigma_row = w.std(dim=1)[idx // 128]
    noise = GaussianNoise(scale=0.3)
    z = torch.stack([noise.sample(w, idx, noise_generator(0, 0, s)) / (0.3 * sigma_row) for s in range(50)]).double()
    assert abs(z.mean().item()) < 4 / math.sqrt(z.numel())
    assert abs(z.var().item() - 1.0) < 0.02

    flat = GaussianNoise(scale=0.3, per_channel=False)
    z = torch.stack([flat.sample(w, idx, noise_generator(1, 0, s)) for s in range(50)]).double() / (0.3 * w.std())
    assert abs(z.var().item() - 1.0) < 0.02


@pytest.mark.parametrize("cls", [NPFTPaperNoise, UniformStepNoise, GaussianNoise, NoNoise])
def test_scale_validation(cls):
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            cls(scale=bad)
    noise = cls(scale=0.5)
    noise.scale = 2.0
    assert noise.scale == 2.0
    with pytest.raises(ValueError, match=">= 0"):
        noise.scale = -1.0
    assert noise.enabled == (cls is not NoNoise)


def test_uniform_step_validation():
    with pytest.raises(ValueError, match="bits=9"):
        UniformStepNoise(bits=9)
    with pytest.raises(ValueError, match="group_size=0"):
        UniformStepNoise(group_size=0)


# ------------------------------------------------------------------ apply / restore


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [NPFTPaperNoise, UniformStepNoise, GaussianNoise])
def test_apply_touches_only_the_mask_and_restores_bit_exactly(cls, dtype):
    model = make_tiny_llama().to(dtype)
    linears = decoder_linears(model)
    masks = select_outliers(magnitude_scores(linears), ratio=2.0)
    before = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    everything = [p.detach().clone() for p in model.parameters()]

    saved = apply_noise(linears, masks, cls(scale=1.0), noise_generator(0, 0, 0))
    assert saved.keys() == masks.keys()
    n_changed = 0
    for name, lin in linears.items():
        changed = (lin.weight != before[name]).reshape(-1).nonzero().squeeze(1)
        assert torch.isin(changed, masks[name]).all()  # nothing outside the mask moved
        n_changed += changed.numel()
        assert torch.equal(saved[name], before[name].reshape(-1)[masks[name]])
    assert n_changed > 0.5 * sum(m.numel() for m in masks.values())

    restore_noise(linears, masks, saved)
    for p, q in zip(model.parameters(), everything):
        assert torch.equal(p, q)


def test_apply_is_deterministic_per_seed_epoch_step():
    def perturbed(step: int) -> dict[str, torch.Tensor]:
        model = make_tiny_llama()
        linears = decoder_linears(model)
        masks = select_outliers(magnitude_scores(linears), ratio=2.0)
        apply_noise(linears, masks, UniformStepNoise(), noise_generator(0, 1, step))
        return {n: lin.weight.detach().clone() for n, lin in linears.items()}

    a, b, c = perturbed(5), perturbed(5), perturbed(6)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_no_noise_leaves_weights_untouched(tiny_llama):
    linears = decoder_linears(tiny_llama)
    masks = select_outliers(magnitude_scores(linears), ratio=2.0)
    before = {n: lin.weight.detach().clone() for n, lin in linears.items()}
    saved = apply_noise(linears, masks, NoNoise(), noise_generator(0))
    assert saved == {}
    assert all(torch.equal(lin.weight, before[n]) for n, lin in linears.items())
    assert torch.equal(NoNoise().sample(before["model.layers.0.mlp.up_proj"], torch.arange(5), noise_generator(0)), torch.zeros(5))
    restore_noise(linears, masks, saved)  # a no-op
    assert all(torch.equal(lin.weight, before[n]) for n, lin in linears.items())


def test_empty_mask_is_skipped(tiny_llama):
    linears = decoder_linears(tiny_llama)
    name = "model.layers.0.mlp.up_proj"
    masks = {name: torch.empty(0, dtype=torch.long)}
    before = linears[name].weight.detach().clone()
    saved = apply_noise(linears, masks, GaussianNoise(), noise_generator(0))
    assert torch.equal(linears[name].weight, before) and saved[name].numel() == 0


# ------------------------------------------------------------------ schedule


def test_scale_schedule_hand_checked():
    assert scale_schedule(0, 110, 2.0, warmup_steps=10) == 0.0
    assert scale_schedule(9, 110, 2.0, warmup_steps=10) == 0.0
    assert scale_schedule(10, 110, 2.0, warmup_steps=10) == 2.0
    assert scale_schedule(500, 110, 2.0) == 2.0

    assert scale_schedule(10, 110, 2.0, 10, "linear") == 0.0
    assert scale_schedule(60, 110, 2.0, 10, "linear") == pytest.approx(1.0)
    assert scale_schedule(85, 110, 2.0, 10, "linear") == pytest.approx(1.5)
    assert scale_schedule(110, 110, 2.0, 10, "linear") == pytest.approx(2.0)
    assert scale_schedule(200, 110, 2.0, 10, "linear") == pytest.approx(2.0)

    assert scale_schedule(10, 110, 2.0, 10, "cosine") == pytest.approx(0.0)
    assert scale_schedule(35, 110, 2.0, 10, "cosine") == pytest.approx(1 - math.sqrt(2) / 2)
    assert scale_schedule(60, 110, 2.0, 10, "cosine") == pytest.approx(1.0)
    assert scale_schedule(110, 110, 2.0, 10, "cosine") == pytest.approx(2.0)
    assert scale_schedule(5, 4, 2.0, 10, "linear") == 0.0  # still warming up
    assert scale_schedule(12, 4, 2.0, 10, "linear") == 2.0  # total <= warmup: straight to base

    with pytest.raises(ValueError, match="constant, linear, cosine"):
        scale_schedule(0, 10, 1.0, ramp="step")
