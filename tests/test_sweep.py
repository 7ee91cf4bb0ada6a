"""A Hydra sweep through the real ``train.py -m`` and its report (table + plot)."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import QUIET_TRAIN, TINY_TRAIN, run_python, run_sweep

TINY = [*TINY_TRAIN, *QUIET_TRAIN, "data.max_eval_windows=1", "trainer.max_steps=2"]


@pytest.mark.slow
def test_noise_scale_sweep_writes_each_job_and_the_report(tmp_path):
    proc = run_sweep(tmp_path / "sweep", *TINY, "noise.scale=0,1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = tmp_path / "sweep"
    for num, scale in enumerate([0.0, 1.0]):
        job = root / str(num)
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["config"]["noise"]["scale"] == scale
        assert metrics["ppl"]["after"].keys() == {"fp", "rtn4"}
        assert (job / ".hydra" / "config.yaml").is_file() and (job / "adapter" / "adapter_config.json").is_file()

    proc = run_python(["-m", "npft_lightning", "report", str(root)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((root / "report.csv").open()))
    assert [(r["noise.scale"], r["control"]) for r in rows] == [("0", "True"), ("1", "False")]
    assert all(float(r["ppl_after/rtn4"]) > 1 for r in rows)
    assert "| 0 | 0 | **control** |" in (root / "report.md").read_text()
    assert (root / "ppl_vs_noise.scale.png").read_bytes()[:4] == b"\x89PNG"

    # Re-running the sweep with skip_completed=true trains only what did not finish (here: job 1).
    (root / "1" / "metrics.json").unlink()
    stamp = (root / "0" / "metrics.json").stat().st_mtime_ns
    proc = run_sweep(tmp_path / "sweep", *TINY, "noise.scale=0,1", "skip_completed=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Skipped:") == 1
    assert (root / "0" / "metrics.json").stat().st_mtime_ns == stamp and (root / "1" / "metrics.json").is_file()


def test_ddp_with_lightning_relaunch_is_refused_inside_a_sweep(tmp_path):
    """strategy=ddp re-runs the command line for rank 1, which for -m would restart the sweep: one clear line instead."""
    proc = run_sweep(tmp_path / "sweep", *TINY, "noise.scale=1", "trainer=ddp_cpu", "trainer.strategy=ddp")
    assert proc.returncode == 2
    assert "use trainer=ddp_spawn" in proc.stderr and "Traceback" not in proc.stderr
