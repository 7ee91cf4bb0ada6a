"""The real Hydra entry point, driven in a subprocess (as a user runs it)."""

from __future__ import annotations

import json

import pytest
from helpers import TINY_TRAIN, run_entry

TINY = [*TINY_TRAIN, "data.max_eval_windows=2", "curvature.windows=2", "curvature.length=64"]


def test_fast_dev_run_through_the_real_entry(tmp_path):
    proc = run_entry("train.py", tmp_path, *TINY, "trainer.fast_dev_run=true", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["ppl"]["before"]) == {"fp", "rtn4", "rtn3_g32"}
    assert "Validation perplexity" in proc.stdout


@pytest.mark.slow
def test_short_training_run_writes_before_and_after(tmp_path):
    proc = run_entry("train.py", tmp_path, *TINY, "trainer.max_steps=3", "quant=[rtn4,rtn3]", "noise=npft_paper", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["ppl"]["after"]) == {"fp", "rtn4", "rtn3"}
    assert metrics["train"]["global_step"] == 3
    # Timing: 3 batches give 2 intervals between batch ends; their median lies within the whole training time.
    assert 0 < metrics["train"]["median_batch_seconds"] < metrics["train"]["train_seconds"]
    assert set(metrics["curvature"]) == {"before", "after"}
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_real_smollm2_end_to_end(tmp_path):
    """The bundled SmolLM2-135M on Wikipedia: a few steps, before/after table, plausible numbers."""
    proc = run_entry(
        "train.py", tmp_path, "trainer.max_steps=2", "data.max_eval_windows=1", "data.eval_seq_len=512",
        "outliers.calibration_windows=2", "curvature.windows=1", timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    before, after = metrics["ppl"]["before"], metrics["ppl"]["after"]
    assert 5 < before["fp"] < 40  # SmolLM2 on Wikipedia leads is ~13 at 2048 tokens
    assert before["rtn3_g32"] > before["rtn4"] > before["fp"]  # quantization hurts, 3-bit more
    assert after["fp"] < before["fp"] * 1.05
