"""Which optimizer steps are perturbed, and which target grid a perturbed step takes.

Pure functions of (seed, epoch, step, run length): every DDP rank and a resumed run draw the same
steps and grids without any state in the checkpoint.

* ``placement``: ``random`` draws the perturbed steps from the whole run; ``last`` only from its
  last ``last_fraction`` (the LR cooldown), the steps before it train clean.
* ``share``: each step of that window is perturbed with probability ``share``
  (``noise.step_probability``); ``ramp`` lets that probability rise from 0 at the window's first
  step to ``share`` at its end (``linear`` / ``cosine``, the noise scale's ramp shapes).
* the grid: a perturbed step picks one of several target quantizers with probability proportional
  to its weight (``noise.distribution.quantizers``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from npft_lightning.npft.noise import RAMPS, noise_generator, scale_schedule

PLACEMENTS = ("random", "last")


def window_start(total_steps: int, placement: str = "random", last_fraction: float = 1.0) -> int:
    """The first step that may be perturbed: 0, or (``last``) the start of the last ``round(last_fraction · total)``
    steps (at least one)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"noise.placement={placement!r} is not one of {', '.join(PLACEMENTS)}")
    if placement == "random":
        return 0
    return max(0, int(total_steps) - max(1, round(float(last_fraction) * int(total_steps))))


def step_share(step: int, total_steps: int, share: float, placement: str = "random", last_fraction: float = 1.0,
               ramp: str = "constant") -> float:
    """The probability that optimizer step ``step`` (0-based) of a run of ``total_steps`` is perturbed."""
    if ramp not in RAMPS:
        raise ValueError(f"noise.step_probability_ramp={ramp!r} is not one of {', '.join(RAMPS)}")
    start = window_start(total_steps, placement, last_fraction)
    if step < start:
        return 0.0
    return scale_schedule(step - start, total_steps - start, share, 0, ramp)


def step_is_perturbed(seed: int, epoch: int, step: int, share: float) -> bool:
    """Bernoulli(``share``) for one optimizer step, from the step's own stream; no draw when the share is 0 or 1."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    return bool(torch.rand(1, generator=noise_generator(seed, epoch, -2 - step)) < share)


def grid_index(seed: int, epoch: int, step: int, weights: Sequence[float]) -> int:
    """The target grid of a perturbed step: index ``i`` with probability ``weights[i] / sum(weights)``."""
    if len(weights) == 1:
        return 0
    generator = noise_generator(seed, epoch, step, stream="npft-grid")
    return int(torch.multinomial(torch.tensor([float(w) for w in weights], dtype=torch.float64), 1, generator=generator))
