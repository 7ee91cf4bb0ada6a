"""Checks of single config values shared by every entry's checks: integers, window lengths, devices."""

from __future__ import annotations

import math
from typing import Any

from npft_lightning.core.errors import UserError


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(key: str, value: Any, fix: str, allow_none: bool = False, low: int = 1) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or value < low:
        raise UserError(f"{key}={value} must be an integer >= {low}{' or null' if allow_none else ''}; {fix}")


def finite_number(key: str, value: Any, fix: str, low: float = 0.0, strict: bool = False, allow_none: bool = False) -> None:
    """A finite number >= ``low`` (> ``low`` when ``strict``)."""
    if value is None and allow_none:
        return
    if not is_number(value) or value < low or (strict and value == low):
        bound = f"{'>' if strict else '>='} {low:g}"
        raise UserError(f"{key}={value} must be a finite number {bound}{' or null' if allow_none else ''}; {fix}")


def check_length(key: str, value: Any) -> None:
    """A window length: at least 2 tokens, since a window of one token has nothing to predict."""
    positive_int(key, value, "a window of one token has no next token to predict", low=2)


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_device(key: str, value: Any) -> None:
    """``device`` for eval.py / analyze.py: null (cuda when available, else cpu), cpu, cuda, cuda:<n> or mps."""
    if value is None:
        return
    import torch

    try:
        device = torch.device(str(value))
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"{key}={value} is not one of cpu, cuda, cuda:<index>, mps; or null (cuda when available, else cpu)")
    gpus = visible_gpus()
    if device.type == "cuda" and gpus == 0:
        raise UserError(f"{key}={value} needs a CUDA GPU, but none is visible (torch.cuda.is_available() is False); "
                        f"use {key}=cpu or null")
    if device.type == "cuda" and device.index is not None and device.index >= gpus:
        raise UserError(f"{key}={value} but only {gpus} GPU(s) are visible; use {key}=cuda:0 .. cuda:{gpus - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{key}={value} needs Apple's MPS backend, which this PyTorch cannot use; use {key}=cpu or null")
