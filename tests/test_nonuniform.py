"""Non-uniform quantizers (k-means, cube-root, NormalFloat) and the dense-and-sparse wrapper."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.topk import top_fraction_mask
from npft_lightning.quant import RTN, fake_quantized
from npft_lightning.quant.gptq import GPTQ
from npft_lightning.quant.nonuniform import (
    NF,
    NF4,
    NF4_LEVELS,
    CubeRoot,
    KMeans,
    cuberoot_quantize,
    kmeans_encode,
    kmeans_quantize,
    nf4_quantize,
    nf_levels,
    nf_quantize,
)
from npft_lightning.quant.rtn import rtn_quantize
from npft_lightning.quant.sparse import DenseAndSparse


def _gauss(rows: int = 64, cols: int = 256, seed: int = 0) -> Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.02


# ---------------------------------------------------------------------------------------------
# k-means
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3])
def test_kmeans_exact_on_few_distinct_values(bits: int) -> None:
    g = torch.Generator().manual_seed(1)
    rows = []
    for n_distinct in (1, 2, 2**bits - 1, 2**bits):
        values = torch.randn(n_distinct, generator=g)
        # very unequal counts, so quantile init starts with duplicate centroids
        counts = torch.randint(1, 40, (n_distinct,), generator=g)
        counts[0] = 200
        row = values.repeat_interleave(counts)[:100]
        row = torch.cat([row, values])[:100]  # every value present
        rows.append(row[torch.randperm(100, generator=g)])
    w = torch.stack(rows)
    assert torch.equal(kmeans_quantize(w, bits), w)


def test_kmeans_beats_rtn_on_gaussian_rows() -> None:
    w = _gauss()
    for bits in (3, 4):
        q = kmeans_quantize(w, bits)
        assert (q - w).pow(2).mean() < (rtn_quantize(w, bits) - w).pow(2).mean()
        assert all(len(row.unique()) <= 2**bits for row in q)


def test_kmeans_converges_to_a_lloyd_fixed_point() -> None:
    w = _gauss(16, 128)
    s = torch.rand(w.shape, generator=torch.Generator().manual_seed(2))
    codes, lut = kmeans_encode(w, 3, sensitivity=s, iters=200)
    assert torch.all(lut[:, 1:] >= lut[:, :-1])
    # every value sits at its nearest centroid ...
    assert torch.allclose((w - lut.gather(1, codes.long())).abs(), (w[..., None] - lut[:, None, :]).abs().amin(-1))
    # ... and every centroid is the weighted mean of its values
    onehot = torch.nn.functional.one_hot(codes.long(), 8).float()
    mass = (onehot * s[..., None]).sum(1)
    mean = (onehot * (s * w)[..., None]).sum(1) / mass.clamp(min=1e-12)
    assert torch.allclose(lut[mass > 0], mean[mass > 0], atol=1e-6)


def test_kmeans_sensitivity_pulls_centroids() -> None:
    w = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    codes, lut = kmeans_encode(w, 1)
    assert torch.allclose(lut, torch.tensor([[1.0, 10.0]]))  # uniform: mean of {0, 1, 2}
    codes, lut = kmeans_encode(w, 1, sensitivity=torch.tensor([[1.0, 1.0, 100.0, 1.0]]))
    assert torch.allclose(lut, torch.tensor([[201.0 / 102.0, 10.0]]))  # weighted mean, pulled to 2
    assert codes.tolist() == [[0, 0, 0, 1]] and codes.dtype == torch.uint8


def test_kmeans_quantizer_uses_sensitivity_by_name() -> None:
    w = _gauss(8, 64)
    q = KMeans(bits=3)
    assert q.name == "kmeans3"
    plain = q.quantize_weight(w, name="a")
    s = torch.ones_like(w)
    s[:, :4] = 1e4  # the first columns dominate: they are represented (almost) exactly
    q.sensitivity = {"a": s}
    weighted = q.quantize_weight(w, name="a")
    assert (weighted - w)[:, :4].abs().max() < (plain - w)[:, :4].abs().max()
    assert torch.equal(q.quantize_weight(w, name="other"), plain)


# ---------------------------------------------------------------------------------------------
# cube-root
# ---------------------------------------------------------------------------------------------


def test_cuberoot_fixed_points_and_sign() -> None:
    bits = 4
    f = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    grid_f = rtn_quantize(f, bits)  # values on a uniform grid in the cube-root domain
    w = grid_f**3
    q = cuberoot_quantize(w, bits)
    assert torch.allclose(q, w, rtol=1e-4, atol=1e-7)
    # the codes of w in the f-domain are those of grid_f
    assert torch.equal(q == 0, w == 0)

    w = _gauss()
    q = cuberoot_quantize(w, bits)
    assert (torch.sign(q) * torch.sign(w) >= 0).all()
    assert all(len(row.unique()) <= 2**bits for row in q)


def test_cuberoot_small_values_have_smaller_relative_error() -> None:
    w = _gauss(64, 512)
    small = w.abs() < w.abs().median()
    rel = lambda q: ((q - w).abs() / w.abs())[small].mean()  # noqa: E731
    assert rel(cuberoot_quantize(w, 4)) < 0.75 * rel(rtn_quantize(w, 4))
    assert CubeRoot().name == "cuberoot4" and CubeRoot(3, group_size=32).name == "cuberoot3_g32"
    assert torch.equal(CubeRoot(3, group_size=32).quantize_weight(w), cuberoot_quantize(w, 3, 32))


# ---------------------------------------------------------------------------------------------
# NormalFloat
# ---------------------------------------------------------------------------------------------


def test_nf4_table() -> None:
    levels = nf_levels(4)
    assert levels.shape == (16,) and levels[0] == -1 and levels[-1] == 1 and (levels == 0).sum() == 1
    assert torch.all(levels[1:] > levels[:-1])
    # our quantile construction reproduces the published table; other widths are built the same way
    n = 2**4
    offset = 1 - 0.5 * (1 / (2 * (n - 1)) + 1 / (2 * n))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    built = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    assert torch.allclose(built / built.max(), torch.tensor(NF4_LEVELS, dtype=torch.float64), atol=1e-6)
    l3 = nf_levels(3)
    assert l3.shape == (8,) and l3[0] == -1 and l3[-1] == 1 and (l3 == 0).sum() == 1


def test_nf4_fixed_points_zero_and_error_bound() -> None:
    levels = torch.tensor(NF4_LEVELS)
    absmax = torch.tensor([[0.5], [3.0]])
    block = levels[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    w = torch.cat([block, block.flip(0)])[None] * absmax  # two blocks of 16 per row, each holding ±1·absmax
    assert torch.equal(nf4_quantize(w, block_size=16), w)

    w = _gauss(32, 256)
    w[:, 5] = 0
    w[3, :64] = 0  # an all-zero block stays zero
    q = nf4_quantize(w)
    assert (q[:, 5] == 0).all() and (q[3, :64] == 0).all()
    blocks_absmax = w.reshape(32, 4, 64).abs().amax(-1, keepdim=True)
    bound = (levels[1:] - levels[:-1]).max() / 2 * blocks_absmax
    assert ((q - w).reshape(32, 4, 64).abs() <= bound + 1e-7).all()
    assert NF4().name == "nf4" and NF(3).name == "nf3"
    assert torch.equal(NF4().quantize_weight(w), q)
    assert all(len(row.unique()) <= 8 for row in nf_quantize(w, 3).reshape(-1, 64))


# ---------------------------------------------------------------------------------------------
# dense-and-sparse
# ---------------------------------------------------------------------------------------------


def test_top_fraction_mask() -> None:
    score = torch.arange(1000.0).reshape(10, 100)
    mask = top_fraction_mask(score, 0.45)
    assert mask.sum() == 4 and mask.flatten()[-4:].all()


@pytest.mark.parametrize("base", [RTN(3), KMeans(3), NF4()])
def test_dense_and_sparse_keeps_top_k(base) -> None:
    w = _gauss(64, 256)
    quantizer = DenseAndSparse(base, keep_ratio=1.0)
    assert quantizer.name == f"{base.name}_sparse1"
    sensitivity = torch.rand(w.shape, generator=torch.Generator().manual_seed(3))
    quantizer.sensitivity = {"m": sensitivity}
    q = quantizer.quantize_weight(w, name="m")
    mask = top_fraction_mask(sensitivity, 1.0)
    assert mask.sum() == round(w.numel() * 0.01)
    assert torch.equal(q[mask], w[mask])  # kept exactly
    dense = base.quantize_weight(w.masked_fill(mask, 0), name="m") if not isinstance(base, KMeans) else None
    if dense is not None:
        assert torch.equal(q[~mask], dense[~mask])  # the rest: the base quantizer on the dense part
    assert (q[~mask] != w[~mask]).float().mean() > 0.9
    if isinstance(base, KMeans):
        assert base.sensitivity is None  # restored


def test_dense_and_sparse_magnitude_and_gptq(tiny_opt, token_windows: Tensor) -> None:
    linears = decoder_linears(tiny_opt)
    before = {k: lin.weight.clone() for k, lin in linears.items()}
    quantizer = DenseAndSparse(GPTQ(4), keep_ratio=0.45)
    assert quantizer.name == "gptq4_sparse0.45" and quantizer.needs_calibration
    with fake_quantized(tiny_opt, linears, quantizer, calibration=token_windows):
        for name, lin in linears.items():
            mask = top_fraction_mask(before[name].abs(), 0.45)  # magnitude when no sensitivity
            assert mask.sum() > 0
            assert torch.equal(lin.weight[mask], before[name][mask])
            rest = lin.weight[~mask]
            assert (rest != before[name][~mask]).float().mean() > 0.9
            # the dense part lies on a 4-bit grid: ≤ 16 values per row, besides the kept ones
            assert all(len(row[~m].unique()) <= 16 for row, m in zip(lin.weight, mask))
    assert all(torch.equal(before[k], lin.weight) for k, lin in linears.items())
