"""bench/requant.py: the ReQuant study driver end to end on a tiny model, resume, and the generated table."""

from __future__ import annotations

import json
import sys

import pytest
from helpers import ROOT, run_python

sys.path.insert(0, str(ROOT / "bench"))

import requant  # noqa: E402


@pytest.mark.slow
def test_requant_study_end_to_end_on_tiny_llama(tmp_path):
    ood = tmp_path / "ood.txt"
    ood.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n\n" * 40)
    args = ["--model", "tiny-llama", "--bases", "rtn4", "--rows", "pretrained", "control", "--steps", "2",
            "--max-eval-windows", "1", "--calib-windows", "2", "--pqi-windows", "2", "--pqi-intervals", "1",
            "--eval-seq-len", "256", "--ood-text", str(ood), "--set", "data.seq_len=128",
            "--train-set", "outliers.calibration_windows=2", "--train-set", "outliers.calibration_length=128",
            "--eval-set", "calibration.length=128", "--eval-set", "calibration.sensitivity_windows=2",
            "--study-dir", str(tmp_path / "study"), "--out-json", str(tmp_path / "r.json"), "--results-md", str(tmp_path / "r.md")]
    first = run_python(["bench/requant.py", *args], timeout=1800, OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "cells: 3 run, 0 reused" in first.stdout  # pretrained eval, control train + eval
    result = json.loads((tmp_path / "r.json").read_text())
    cell = result["cells"]["pretrained"]["rtn4"]
    for corpus in ("wiki", "pydoc"):
        assert set(cell[corpus]["ppl"]) == {"fp", *requant.columns("rtn4")}
    bits = cell["wiki"]["bits"]
    # the three sparse columns keep 0.5 % of the weights: same sparse bytes; the base alone has none
    assert bits["rtn4"]["sparse_entries"] == 0
    sparse = {q: bits[q]["sparse_entries"] for q in requant.columns("rtn4")[1:]}
    assert max(sparse.values()) - min(sparse.values()) <= 14  # per-matrix rounding of the dense-and-sparse columns
    assert bits["requant_rtn4"]["bits_per_weight"] > bits["rtn4"]["bits_per_weight"]
    assert set(result["cells"]["control"]["bases"]["wiki"]["ppl"]) == {"fp", "rtn4"}
    text = (tmp_path / "r.md").read_text()
    assert "Reduced study" in text and "ReQuant 0.45 + 0.05 %" in text and "| control |" in text and " b)" in text

    second = run_python(["bench/requant.py", *args], OMP_NUM_THREADS="1")
    assert second.returncode == 0 and "cells: 0 run, 3 reused" in second.stdout
    assert json.loads((tmp_path / "r.json").read_text())["cells"] == result["cells"]


def test_requant_overrides_reach_only_requant_columns():
    assert requant.requant_overrides(requant.columns("gptq3_g32"), 16, 4) == [
        "quant.requant_gptq3_g32.calibration_windows=16", "quant.requant_gptq3_g32.pqi_intervals=4",
        "quant.requant_gptq3_g32_ro0.calibration_windows=16", "quant.requant_gptq3_g32_ro0.pqi_intervals=4"]
    assert requant.requant_overrides(["rtn4"], 16, None) == []
