"""Where the perturbed steps go and which grid each one takes (``npft.placement``), and a resume through them.

The draws are pure functions of (seed, epoch, step, run length): checked on step indices, against the formula they
implement, and through a Lightning checkpoint resume that replays perturbed steps of different grids.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import StepLogger, make_datamodule, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from npft_lightning.npft.noise import QuantErrorNoise, noise_generator
from npft_lightning.npft.outliers import OutlierSelector
from npft_lightning.npft.placement import (
    grid_index,
    step_is_perturbed,
    step_share,
    window_start,
)
from npft_lightning.quant import RTN
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.training.callbacks import NoisePerturbation, OutlierSelection


def perturbed(seed: int, total: int, share: float, **placement) -> set[int]:
    return {s for s in range(total) if step_is_perturbed(seed, 0, s, step_share(s, total, share, **placement))}


def uniform(seed: int, step: int) -> float:
    """The step's own uniform number, as the mixed objective has drawn it since it was added."""
    return float(torch.rand(1, generator=noise_generator(seed, 0, -2 - step)))


def test_random_placement_draws_what_the_mixed_objective_always_drew():
    """The default recipe (random placement, constant share 0.15) perturbs exactly the steps it perturbed before:
    the step's uniform number below the share."""
    for seed in (0, 26, 197):
        assert perturbed(seed, 300, 0.15) == {s for s in range(300) if uniform(seed, s) < 0.15}
    assert perturbed(26, 4, 0.15) == {0, 2}
    assert perturbed(3, 50, 1.0) == set(range(50))


@pytest.mark.parametrize("total, fraction, first", [(20, 0.25, 15), (256, 0.15, 218), (10, 0.01, 9), (8, 1.0, 0)])
def test_last_placement_perturbs_only_the_last_fraction(total, fraction, first):
    assert window_start(total, "last", fraction) == first
    assert perturbed(0, total, 1.0, placement="last", last_fraction=fraction) == set(range(first, total))
    # with a share < 1: the random draw, restricted to the window
    assert perturbed(5, total, 0.5, placement="last", last_fraction=fraction) == \
        {s for s in range(first, total) if uniform(5, s) < 0.5}


@pytest.mark.parametrize("placement, fraction", [("random", 1.0), ("last", 0.5)])
def test_share_ramp_rises_from_zero_to_the_share(placement, fraction):
    total, share = 400, 0.6
    start = window_start(total, placement, fraction)
    linear = [step_share(s, total, share, placement, fraction, "linear") for s in range(total)]
    assert all(p == 0 for p in linear[: start + 1])
    assert linear == pytest.approx([0.0] * start + [share * k / (total - start) for k in range(total - start)], abs=1e-12)
    cosine = [step_share(s, total, share, placement, fraction, "cosine") for s in range(start, total)]
    assert cosine == sorted(cosine) and cosine[0] == 0 and cosine[-1] < share
    drawn = perturbed(7, total, share, placement=placement, last_fraction=fraction, ramp="linear")
    assert drawn == {s for s in range(start, total) if uniform(7, s) < share * (s - start) / (total - start)}
    half = start + (total - start) // 2
    assert len([s for s in drawn if s < half]) < len([s for s in drawn if s >= half])


def test_grid_draw_is_seeded_and_follows_the_weights():
    """Deterministic: the same (seed, epoch, step) gives the same grid; over 20 000 steps each grid's count is within
    5 standard deviations of its weight's share (a fixed seed: the check cannot flake)."""
    weights = [1.0, 2.0, 3.0, 2.0]
    draws = [grid_index(0, 0, s, weights) for s in range(20_000)]
    assert draws[:50] == [grid_index(0, 0, s, weights) for s in range(50)]
    assert draws[:50] != [grid_index(1, 0, s, weights) for s in range(50)]
    n = len(draws)
    for i, w in enumerate(weights):
        p = w / sum(weights)
        assert abs(draws.count(i) - n * p) < 5 * math.sqrt(n * p * (1 - p)), (i, draws.count(i))
    assert grid_index(0, 0, 3, [5.0]) == 0


def test_several_grids_need_one_target_and_positive_weights():
    with pytest.raises(ValueError, match="needs one target"):
        QuantErrorNoise(RTN(4), quantizers=[{"quantizer": RTN(3), "weight": 1}])
    with pytest.raises(ValueError, match="needs one target"):
        QuantErrorNoise()
    with pytest.raises(ValueError, match=r"quantizers\[1\].weight=0 must be a finite number > 0"):
        QuantErrorNoise(quantizers=[{"quantizer": RTN(4), "weight": 1}, {"quantizer": RTN(3), "weight": 0}])


GRIDS = [{"quantizer": RTN(4), "weight": 1}, {"quantizer": GGMLQuantizer("q4_0"), "weight": 1},
         {"quantizer": RTN(3, group_size=32), "weight": 2}]
STEPS, RESUMED_AT = 8, 4
# The window (the last 3 of 8 steps) starts after the checkpoint at step 4, so a resumed run that mistook the run's
# length would place it elsewhere. Seed 43 perturbs steps 5, 6, 7 with grids 2, 0, 1 (step 4 would be drawn if it
# were in the window): the replay after step 4 holds a clean step and all three grids.
GRID_SEED, LAST_FRACTION = 43, 0.375


def fit_multi_grid(tmp_path, ckpt_path=None):
    module, dm = make_module(), make_datamodule()
    distribution = QuantErrorNoise(quantizers=GRIDS)
    noise = NoisePerturbation(distribution, seed=GRID_SEED, step_probability=0.8, placement="last", last_fraction=LAST_FRACTION,
                              step_probability_ramp="constant")
    logger = StepLogger()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=RESUMED_AT, save_top_k=-1, filename="step{step}")
    trainer = make_trainer([OutlierSelection(OutlierSelector(method="all")), noise, checkpoints], steps=STEPS, logger=logger,
                           enable_checkpointing=True)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    adapters = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    return adapters, logger, noise


def test_a_resume_through_steps_of_different_grids_gives_the_uninterrupted_adapter(tmp_path):
    """Placement ``last`` over the last 3 of 8 steps (each perturbed with probability 0.8), three grids: the run resumed
    from the checkpoint at step 4 replays the same steps with the same grids and ends with the uninterrupted adapter."""
    full, full_log, noise = fit_multi_grid(tmp_path / "full")
    grids = {s: full_log.rows[s].get("noise/grid") for s in range(STEPS)}
    drawn = {s for s in range(STEPS) if noise._step_is_perturbed(0, s)}
    assert drawn == {s for s, g in grids.items() if g is not None} == {5, 6, 7}
    assert all(full_log.rows[s]["noise/scale"] == (1.0 if s in drawn else 0.0) for s in range(STEPS))
    replayed = {grids[s] for s in drawn if s >= RESUMED_AT}
    assert replayed == {0, 1, 2} and set(range(RESUMED_AT, STEPS)) - drawn, grids  # every grid and a clean step replayed
    assert all(grids[s] == grid_index(GRID_SEED, 0, s, [1, 1, 2]) for s in drawn)

    ckpt = next((tmp_path / "full").glob("step*4*.ckpt"))
    resumed, resumed_log, _ = fit_multi_grid(tmp_path / "resumed", ckpt_path=str(ckpt))
    assert {s: resumed_log.rows[s].get("noise/grid") for s in range(RESUMED_AT, STEPS)} == \
        {s: grids[s] for s in range(RESUMED_AT, STEPS)}
    assert full.keys() == resumed.keys() and full
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)
    assert any(float(p.abs().max()) > 0 for n, p in full.items() if "lora_B" in n)
