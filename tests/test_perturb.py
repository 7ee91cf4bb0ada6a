"""Perturbations: exactly the requested coordinates, the requested statistics, bit-exact restore."""

from __future__ import annotations

import pytest
import torch
from helpers import layer_input_and_output, make_tiny_llama

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.topk import row_top_fraction_mask
from npft_lightning.npft.perturb import (
    Perturbation,
    group_range,
    perturb_values,
    perturbed_activations,
    perturbed_weights,
    unit_noise,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def big_weight(seed: int = 0) -> torch.Tensor:
    w = torch.randn(256, 512, generator=gen(seed))
    return torch.where(w.abs() < 1e-3, torch.full_like(w, 1e-3), w)  # no zeros: relative noise is defined everywhere


def test_group_range_by_hand():
    x = torch.tensor([[1.0, -1.0, 4.0, 2.0], [0.0, 0.0, 3.0, -3.0]])
    assert torch.equal(group_range(x), torch.tensor([[5.0] * 4, [6.0] * 4]))
    assert torch.equal(group_range(x, 2), torch.tensor([[2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 6.0, 6.0]]))
    with pytest.raises(ValueError, match="group_size=3 does not divide the 4 features"):
        group_range(x, 3)


def test_rademacher_element_noise_is_exactly_plus_or_minus_m():
    x = torch.tensor([[1.0, -2.0, 4.0, 0.5]])
    y = perturb_values(x, 0.25, gen(), "rademacher", "element")
    assert torch.allclose((y / x - 1).abs(), torch.full_like(x, 0.25))


def test_rademacher_range_noise_by_hand():
    x = torch.tensor([[1.0, -1.0, 4.0, 2.0], [0.0, 0.0, 3.0, -3.0]])
    y = perturb_values(x, 0.1, gen(), "rademacher", "range")
    assert torch.allclose((y - x).abs(), 0.1 * group_range(x))


@pytest.mark.parametrize("distribution, var_factor", [("uniform", 1 / 3), ("gaussian", 1.0), ("rademacher", 1.0)])
@pytest.mark.parametrize("reference", ["element", "range"])
def test_noise_has_the_requested_statistics(distribution, var_factor, reference):
    w, m = big_weight(), 0.2
    y = perturb_values(w, m, gen(1), distribution, reference)
    ref = w if reference == "element" else group_range(w)
    eps = (y - w) / ref  # the relative noise the kind promises
    assert abs(float(eps.mean())) < 0.005
    assert float(eps.var()) == pytest.approx(var_factor * m**2, rel=0.03)
    if distribution == "uniform":
        assert float(eps.abs().max()) <= m * (1 + 1e-4)
        assert float(eps.abs().max()) > 0.99 * m
    if reference == "range":  # the same ε for a whole row would show up as a zero within-row spread: it is i.i.d.
        assert float(eps[0].std()) > 0.5 * m * var_factor**0.5


def test_seeded_generator_reproduces_and_different_seeds_differ():
    w = big_weight()
    a = perturb_values(w, 0.1, gen(5), "gaussian", "element")
    assert torch.equal(a, perturb_values(w, 0.1, gen(5), "gaussian", "element"))
    assert not torch.equal(a, perturb_values(w, 0.1, gen(6), "gaussian", "element"))


def test_mask_touches_exactly_the_masked_coordinates():
    w = big_weight()
    mask = torch.zeros_like(w, dtype=torch.bool)
    mask[3, 7] = mask[100, 0] = mask[255, 511] = True
    y = perturb_values(w, 0.3, gen(), "uniform", "range", mask=mask)
    changed = y != w
    assert torch.equal(changed, mask)  # all masked entries changed, nothing else did (bit-exact elsewhere)


def test_topk_masks_pick_the_largest_magnitudes():
    w = torch.tensor([[0.1, -5.0, 0.2, 3.0], [-0.3, 0.0, 9.0, 0.4]])
    p = Perturbation("t", mask="topk", ratio=25.0, relative="range", distribution="rademacher")
    y = p.apply(w, 0.1, gen())  # weights: top 25 % of the matrix = 2 entries
    assert torch.equal(y != w, torch.tensor([[False, True, False, False], [False, False, True, False]]))
    rows = row_top_fraction_mask(w, 50.0)  # per row (tokens): the 2 largest |x| of each row
    assert torch.equal(rows, torch.tensor([[False, True, False, True], [False, False, True, True]]))


def test_index_mask_from_flat_outlier_indices():
    mask = mask_ops.boolean(torch.tensor([1, 5]), (2, 3))
    assert torch.equal(mask, torch.tensor([[False, True, False], [False, False, True]]))


def test_sign_preserving_never_flips_a_sign_and_free_does():
    w = big_weight()
    free = perturb_values(w, 1.5, gen(2), "gaussian", "element")
    kept = perturb_values(w, 1.5, gen(2), "gaussian", "element", sign_preserving=True)
    assert (free * w < 0).any()
    assert not (kept * w < 0).any()
    flipped = free * w < 0
    assert torch.equal(kept[flipped], torch.zeros(int(flipped.sum())))  # clamped at 0
    assert torch.equal(kept[~flipped], free[~flipped])  # same draws elsewhere


def test_unit_noise_rejects_unknown_distribution():
    with pytest.raises(ValueError, match="distribution='laplace' is not one of"):
        unit_noise(3, "laplace", gen())


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="activation", mask="outliers"), "mask=outliers marks weights"),
    (dict(mask="topk"), "ratio=None must be a percentage"),
    (dict(relative="row"), "relative='row' is not one of element, range"),
    (dict(magnitudes=[]), "magnitudes=\\[\\] must be a non-empty list"),
    (dict(magnitudes=[-0.1]), "must be a non-empty list of finite numbers >= 0"),
])
def test_bad_perturbation_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Perturbation("k", **kwargs)


def _snapshot(linears):
    return {k: v.weight.detach().clone() for k, v in linears.items()}


@pytest.mark.parametrize("mask", ["all", "topk", "outliers"])
def test_perturbed_weights_touch_the_mask_and_restore_bit_exactly(mask):
    model = make_tiny_llama()
    linears = decoder_linears(model)
    clean = _snapshot(linears)
    outliers = None
    if mask == "outliers":  # a few flat indices in two matrices; the rest must stay untouched
        names = sorted(linears)
        outliers = {names[0]: torch.tensor([0, 5, 17]), names[3]: torch.tensor([2])}
    p = Perturbation("k", distribution="uniform", relative="range", mask=mask, ratio=2.0 if mask == "topk" else None)
    with perturbed_weights(linears, p, 0.1, gen(3), outliers) as touched:
        changed = {k: (v.weight != clean[k]) for k, v in linears.items()}
        n_changed = sum(int(c.sum()) for c in changed.values())
        assert n_changed == touched
        if mask == "all":
            assert touched == sum(w.numel() for w in clean.values())
        if mask == "topk":
            for k, c in changed.items():
                assert int(c.sum()) == round(clean[k].numel() * 0.02)
                assert clean[k].abs()[c].min() >= clean[k].abs()[~c].max()
        if mask == "outliers":
            assert touched == 4
            for k, c in changed.items():
                expected = mask_ops.boolean(outliers[k], c.shape) if k in outliers else torch.zeros_like(c)
                assert torch.equal(c, expected)
    after = _snapshot(linears)
    assert all(torch.equal(after[k], clean[k]) for k in clean)


def test_perturbed_weights_restore_after_an_error_and_follow_the_seed():
    model = make_tiny_llama()
    linears = decoder_linears(model)
    clean = _snapshot(linears)
    p = Perturbation("k", distribution="gaussian", relative="element")
    with perturbed_weights(linears, p, 0.1, gen(4)):
        first = _snapshot(linears)
    with perturbed_weights(linears, p, 0.1, gen(4)):
        assert all(torch.equal(first[k], v.weight) for k, v in linears.items())
    with pytest.raises(RuntimeError, match="evaluation failed"):
        with perturbed_weights(linears, p, 0.1, gen(4)):
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(clean[k], v.weight) for k, v in linears.items())


def test_perturbed_activations_perturb_each_linear_input_then_go_away():
    model = make_tiny_llama()
    linears = decoder_linears(model)
    name = "model.layers.0.self_attn.q_proj"
    layer = linears[name]
    p = Perturbation("a", target="activation", distribution="rademacher", relative="element")
    ids = torch.randint(0, 256, (1, 16), generator=gen(0))
    with layer_input_and_output(layer) as seen:
        with torch.no_grad(), perturbed_activations({name: layer}, p, 0.5, gen(0)):
            model(input_ids=ids)
    # the layer saw a perturbed input: its output is not that of the clean input
    assert not torch.allclose(seen["out"], layer(seen["raw"]), atol=1e-5)
    assert len(layer._forward_pre_hooks) == 0
    with pytest.raises(ValueError, match="targets activations, not weights"):
        with perturbed_weights(linears, p, 0.1, gen()):
            pass


def test_activation_perturbation_by_hand_on_one_linear():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 3)
    x = torch.randn(2, 5, 8)
    p = Perturbation("a", target="activation", distribution="uniform", relative="range", mask="topk", ratio=25.0)
    with torch.no_grad(), perturbed_activations({"l": layer}, p, 0.2, gen(9)):
        out = layer(x)
    expected = layer(p.apply(x, 0.2, gen(9)))
    assert torch.allclose(out, expected)
    changed = p.apply(x, 0.2, gen(9)) != x
    assert torch.equal(changed.sum(-1), torch.full((2, 5), 2))  # top 25 % of 8 features per token
