"""Helpers shared by the benchmark scripts: compose the project's Hydra config, time training steps."""

from __future__ import annotations

import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_config(overrides: list[str], output_dir: str | Path) -> DictConfig:
    """The composed ``conf/train.yaml`` with ``overrides``, as ``train.py`` would see it."""
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


class StepClock(Callback):
    """Wall time of each training batch, from before the first callback's batch-start hook to after the last's
    batch-end hook: put one instance first and one last in the callback list (``first=True``/``False``).
    ``shared["cpu_steps"]`` gets the process's CPU time (all its threads) of each batch: on a machine shared with
    other jobs it moves less than the wall time."""

    def __init__(self, first: bool, shared: dict[str, Any]):
        self.first, self.shared = first, shared

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first:
            self.shared["t0"], self.shared["cpu0"] = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.first:
            self.shared.setdefault("steps", []).append(time.perf_counter() - self.shared.pop("t0"))
            self.shared.setdefault("cpu_steps", []).append(time.process_time() - self.shared.pop("cpu0"))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def machine() -> dict[str, Any]:
    return {"date": date.today().isoformat(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    from npft_lightning.core.io import atomic_write_json

    atomic_write_json(path, data)
    print(f"wrote {path}")


class StudyError(Exception):
    """A problem with a study's input (bench/quality.py, bench/requant.py); printed as one line."""
