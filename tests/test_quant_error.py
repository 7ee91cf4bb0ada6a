"""Noise up to the exact quantization error: quant_error, Quant-Noise probability, outliers=all, mask forms, damage."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import TARGETS, WeightSpy, make_datamodule, make_module
from torch import nn

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.noise import (
    QuantErrorNoise,
    UniformStepNoise,
    apply_noise,
    noise_generator,
    restore_noise,
)
from npft_lightning.npft.outliers import (
    OutlierSelector,
    damage_scores,
    magnitude_scores,
    mask_bytes,
)
from npft_lightning.quant import RTN
from npft_lightning.training.callbacks import NoisePerturbation


def _merged(module) -> dict[str, torch.Tensor]:
    deltas = module.lora_deltas()
    return {n: lin.weight.detach().float() + deltas[n] for n, lin in module.decoder_linears().items()}


def test_lora_deltas_are_peft_merge_computed_per_read():
    """The merged updates equal what PEFT's own merge adds to each base weight; they are computed when read
    (a later adapter change shows in the next read) and carry no autograd graph."""
    module = make_module()
    deltas = module.lora_deltas()
    before = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    merged = copy.deepcopy(module.model).merge_and_unload()
    after = {n: lin.weight.detach() for n, lin in decoder_linears(merged).items()}
    assert sorted(deltas) == sorted(n for n in before if n.split(".")[-1] in TARGETS) and len(deltas) > 0
    for name in deltas:
        assert torch.allclose(before[name] + deltas[name], after[name], atol=1e-6)
        assert not deltas[name].requires_grad
    lora_b = next(p for n, p in module.named_parameters() if "lora_B" in n)
    name = next(iter(deltas))
    first = deltas[name].clone()
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.mul_(2)
    assert torch.allclose(deltas[name], 2 * first)
    assert lora_b.requires_grad


# ------------------------------------------------------------------ masks


def test_mask_forms_roundtrip_and_pick_the_smallest():
    size = 1000
    sparse = torch.tensor([3, 17, 999], dtype=torch.int32)
    assert mask_ops.compact(sparse, size) is sparse  # 12 bytes < 125 bytes of bits
    dense_idx = torch.arange(0, size, 7, dtype=torch.int32)  # 143 entries: 572 bytes > 125
    bits = mask_ops.compact(dense_idx, size)
    assert isinstance(bits, mask_ops.BitMask) and mask_ops.nbytes(bits) == 125 and bits.numel() == 143
    assert torch.equal(mask_ops.index(bits), dense_idx.long())
    assert isinstance(mask_ops.compact(torch.arange(size), size), mask_ops.AllEntries)
    for m in (sparse, bits, mask_ops.AllEntries(size)):
        back = mask_ops.mask_from_state(mask_ops.mask_state(m))
        assert mask_ops.count(back) == mask_ops.count(m)
        a, b = mask_ops.index(back), mask_ops.index(m)
        assert (a is None and b is None) or torch.equal(a, b)


def test_bitmask_noise_equals_index_noise():
    module = make_module()
    linears = module.decoder_linears()
    idx = {n: torch.arange(0, l.weight.numel(), 5, dtype=torch.int32) for n, l in linears.items()}
    bits = {n: mask_ops.compact(i, linears[n].weight.numel()) for n, i in idx.items()}
    assert all(isinstance(b, mask_ops.BitMask) for b in bits.values())
    clean = {n: l.weight.detach().clone() for n, l in linears.items()}
    outs = []
    for masks in (idx, bits):
        saved = apply_noise(linears, masks, UniformStepNoise(), noise_generator(1, 0, 0))
        outs.append({n: l.weight.detach().clone() for n, l in linears.items()})
        restore_noise(linears, masks, saved)
        assert all(torch.equal(l.weight, clean[n]) for n, l in linears.items())
    assert all(torch.equal(outs[0][n], outs[1][n]) for n in clean)


# ------------------------------------------------------------------ quant_error


@pytest.mark.parametrize("quantizer", [RTN(4), RTN(3, group_size=16), RTN(4, group_size=16, sym=True)], ids=repr)
def test_quant_error_makes_the_forward_see_q_of_the_merged_weight(quantizer):
    module = make_module()
    linears = module.decoder_linears()
    merged = _merged(module)
    masks = {n: torch.arange(0, l.weight.numel(), 3, dtype=torch.int32) for n, l in linears.items()}
    clean = {n: l.weight.detach().clone() for n, l in linears.items()}
    saved = apply_noise(linears, masks, QuantErrorNoise(quantizer), noise_generator(0, 0, 0), module.lora_deltas())
    for name, linear in linears.items():
        effective = (linear.weight.detach() + module.lora_deltas()[name]).reshape(-1)
        target = quantizer.quantize_weight(merged[name]).reshape(-1)
        sel = masks[name].long()
        assert torch.allclose(effective[sel], target[sel], atol=1e-6, rtol=0)  # Q(merged) at the selected weights
        rest = torch.ones_like(effective, dtype=torch.bool)
        rest[sel] = False
        assert torch.equal(linear.weight.detach().reshape(-1)[rest], clean[name].reshape(-1)[rest])  # untouched elsewhere
    restore_noise(linears, masks, saved)
    assert all(torch.equal(l.weight, clean[n]) for n, l in linears.items())


def test_quant_error_gradients_equal_the_straight_through_gradients_of_the_quantized_merged_weight():
    module, dm = make_module(), make_datamodule()
    module.train()
    batch = next(iter(dm.train_dataloader()))
    linears = module.decoder_linears()
    quantizer = RTN(3)
    selector = OutlierSelector(method="all")
    masks = selector.select(module.model, linears, None)
    merged = _merged(module)

    saved = apply_noise(linears, masks, QuantErrorNoise(quantizer), noise_generator(0, 0, 0), module.lora_deltas())
    module.model.zero_grad()
    module.training_step(batch, 0).backward()
    restore_noise(linears, masks, saved)
    lora_grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if "lora_" in n}

    # Reference: the plain merged model with Q(merged) weights; the adapters' gradients follow by the chain rule
    # through ΔW = s·B·A with the quantizer skipped (straight through).
    reference = copy.deepcopy(module.model).merge_and_unload()
    ref_linears = decoder_linears(reference)
    with torch.no_grad():
        for n, lin in ref_linears.items():
            lin.weight.copy_(quantizer.quantize_weight(merged[n]))
    for p in reference.parameters():
        p.requires_grad_(False)
    for lin in ref_linears.values():
        lin.weight.requires_grad_(True)
    logits = reference(input_ids=batch).logits
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
    loss.backward()
    checked = 0
    for name, module_ in module.model.named_modules():
        if not hasattr(module_, "lora_A") or "default" not in getattr(module_, "lora_A", {}):
            continue
        key = name.replace("base_model.model.", "")
        g = ref_linears[key].weight.grad
        a, b = module_.lora_A["default"].weight, module_.lora_B["default"].weight
        s = module_.scaling["default"]
        torch.testing.assert_close(lora_grads[f"{name}.lora_B.default.weight"], s * g @ a.T, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(lora_grads[f"{name}.lora_A.default.weight"], s * b.T @ g, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == len(linears)


def test_quant_error_in_training_leaves_base_weights_bit_exact():
    module, dm = make_module(), make_datamodule()
    import lightning.pytorch as pl

    from npft_lightning.training.callbacks import OutlierSelection

    clean = {k: v.weight.detach().clone() for k, v in module.decoder_linears().items()}
    spy = WeightSpy()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[OutlierSelection(OutlierSelector(method="all")), NoisePerturbation(QuantErrorNoise(RTN(4)), seed=3), spy],
    )
    trainer.fit(module, datamodule=dm)
    assert all(isinstance(m, mask_ops.AllEntries) for m in module.outlier_masks.values())
    for seen in spy.seen:  # the forward saw (nearly) every weight moved onto the grid
        changed = sum(int((seen[n] != clean[n]).sum()) for n in clean)
        assert changed > 0.9 * sum(v.numel() for v in clean.values())
    for after in spy.after:
        assert all(torch.equal(after[n], clean[n]) for n in clean)


def test_outliers_all_touches_every_weight_and_builds_no_index_mask():
    module = make_module()
    linears = module.decoder_linears()
    masks = OutlierSelector(method="all").select(module.model, linears, None)
    assert set(masks) == set(linears)
    assert all(isinstance(m, mask_ops.AllEntries) and m.numel() == linears[n].weight.numel() for n, m in masks.items())
    assert mask_bytes(masks) == 0
    assert not OutlierSelector(method="all").needs_calibration
    clean = {n: l.weight.detach().clone() for n, l in linears.items()}
    saved = apply_noise(linears, masks, UniformStepNoise(), noise_generator(0, 0, 0))
    assert all(bool((l.weight != clean[n]).all()) for n, l in linears.items())
    restore_noise(linears, masks, saved)
    assert all(torch.equal(l.weight, clean[n]) for n, l in linears.items())


def test_probability_selects_the_expected_share():
    w = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))
    exact = QuantErrorNoise(RTN(4)).sample(w, None, noise_generator(0))
    for p in (0.1, 0.5):
        delta = QuantErrorNoise(RTN(4), probability=p).sample(w, None, noise_generator(5, 0, 1))
        kept = delta != 0
        assert torch.equal(delta[kept], exact[kept])  # the weights that take the error take all of it
        share = float(kept.sum()) / float((exact != 0).sum())
        assert share == pytest.approx(p, abs=0.01)  # binomial sd ≈ 0.002 at 65,536 weights
    # and the same draw for the same (seed, epoch, step): every DDP rank and a resumed run agree
    a = QuantErrorNoise(RTN(4), probability=0.3).sample(w, None, noise_generator(5, 0, 1))
    b = QuantErrorNoise(RTN(4), probability=0.3).sample(w, None, noise_generator(5, 0, 1))
    assert torch.equal(a, b)


def test_step_probability_perturbs_the_expected_share_of_steps():
    cb = NoisePerturbation(QuantErrorNoise(RTN(4)), seed=1, step_probability=0.25)
    draws = [cb._step_is_perturbed(0, s) for s in range(4000)]
    assert sum(draws) / len(draws) == pytest.approx(0.25, abs=0.03)
    assert draws == [cb._step_is_perturbed(0, s) for s in range(4000)]
    with pytest.raises(ValueError, match="step_probability=1.5"):
        NoisePerturbation(QuantErrorNoise(RTN(4)), step_probability=1.5)
    with pytest.raises(ValueError, match="needs noise.schedule=per_step"):
        NoisePerturbation(QuantErrorNoise(RTN(4)), step_probability=0.5, schedule="per_epoch")


def test_quant_error_validation():
    with pytest.raises(ValueError, match="probability=0.0 must be in"):
        QuantErrorNoise(RTN(4), probability=0.0)
    gptq = RTN(4)
    gptq.needs_calibration = True
    with pytest.raises(ValueError, match="needs calibration"):
        QuantErrorNoise(gptq)


def test_uniform_step_with_a_quantizer_equals_its_bits_form():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([0, 5, 70, 1000, 1023])
    for group in (None, 16):
        a = UniformStepNoise(bits=3, group_size=group).sample(w, idx, noise_generator(4))
        b = UniformStepNoise(quantizer=RTN(3, group_size=group)).sample(w, idx, noise_generator(4))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        dense = UniformStepNoise(bits=3, group_size=group).sample(w, None, noise_generator(4))
        assert dense.shape == (w.numel(),)


# ------------------------------------------------------------------ damage selector


def test_damage_score_is_fisher_times_step_squared():
    lin = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0, 1.5, -1.5, 0.3], [4.0, -2.0, 0.5, 0.0]]))
    fisher = {"l": torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 1.0, 10.0]])}
    scores = damage_scores(fisher, {"l": lin}, RTN(2))
    # RTN-2 asymmetric per row: step = (max - min) / 3 -> row 0: 3 / 3 = 1, row 1: 6 / 3 = 2.
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 4.0, 4.0, 40.0]])
    torch.testing.assert_close(scores["l"], expected)
    # a high-Fisher weight in a narrow row loses to a lower-Fisher weight in a wide row
    assert scores["l"][1, 0] > scores["l"][0, 2]
    with pytest.raises(ValueError, match="needs a target quantizer with a step size"):
        damage_scores(fisher, {"l": lin}, object())


def test_damage_selector_picks_high_fisher_in_wide_rows(token_windows):
    module = make_module()
    selector = OutlierSelector(method="damage", ratio=5.0, calibration_windows=2, target=RTN(4), progress=False)
    linears = module.decoder_linears()
    windows = token_windows[:2]
    with torch.enable_grad():
        scores = selector.scores(module.model, linears, windows, deltas=module.lora_deltas())
        from npft_lightning.core.gradients import fisher_diagonal

        fisher = fisher_diagonal(module.model, linears, windows, progress=False)
    merged = _merged(module)
    for n in linears:
        torch.testing.assert_close(scores[n], fisher[n] * RTN(4).step(merged[n]).square())
    masks = selector.masks_from_scores(scores)
    assert sum(mask_ops.count(m) for m in masks.values()) == sum(round(l.weight.numel() * 0.05) for l in linears.values())
    _ = magnitude_scores  # the magnitude selector keeps its own test


@pytest.mark.parametrize("group_size,sym", [(None, False), (16, False), (16, True)])
def test_fused_rtn_error_is_bit_identical_to_quantize_minus_weight(group_size, sym):
    from npft_lightning.npft.noise import quantization_error

    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(9)) * 0.05
    w[3] = 0.0  # an all-zero row takes the [-1, 1] range
    q = RTN(3, group_size=group_size, sym=sym)
    assert torch.equal(quantization_error(q, w), q.quantize_weight(w) - w)


def test_checkpoint_state_of_every_mask_form_loads_with_weights_only(tmp_path):
    from npft_lightning.training.callbacks import OutlierSelection

    callback = OutlierSelection(OutlierSelector(method="all"))
    callback.masks = {"a": mask_ops.AllEntries(64), "b": mask_ops.compact(torch.arange(0, 64, 2, dtype=torch.int32), 64),
                      "c": torch.tensor([1, 5], dtype=torch.int32)}
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    restored = OutlierSelection(OutlierSelector(method="all"))
    restored.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert isinstance(restored.masks["a"], mask_ops.AllEntries) and restored.masks["a"].numel() == 64
    assert isinstance(restored.masks["b"], mask_ops.BitMask)
    assert torch.equal(mask_ops.index(restored.masks["b"]), torch.arange(0, 64, 2))
    assert torch.equal(restored.masks["c"], callback.masks["c"])
