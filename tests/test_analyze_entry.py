"""analyze.py on the tiny model: through the real Hydra entry (subprocess) its files, rows and variants; in this process
its bad-input lines, and eval.py on the w/a quantizers."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import TINY_EVAL, TINY_TRAIN, run_entry, run_in_process, tiny_adapter

EVAL_TINY = [*TINY_EVAL, "data.max_eval_windows=2"]
TINY = [*TINY_TRAIN, "data.max_eval_windows=2"]


def test_analysis_of_two_variants_writes_curves_and_tables(tmp_path):
    adapter = tiny_adapter(tmp_path / "adapter")
    out = tmp_path / "run"
    proc = run_entry(
        "analyze.py", out, *TINY, "perturb=[w_uniform_range_outliers,a_uniform_range]",
        "perturb.w_uniform_range_outliers.magnitudes=[0.5,2.0]", "perturb.a_uniform_range.magnitudes=[0.01,0.1,0.5]",
        "quant=[w8a8,w4a8]", f"adapters={{pretrained:null,lora:{adapter}}}", "print_config=false",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "perturbation.csv").open()))
    assert len(rows) == 2 * (2 + 3)
    assert {r["variant"] for r in rows} == {"pretrained", "lora"}
    result = json.loads((out / "analysis.json").read_text())
    base = result["unperturbed"]
    assert base["pretrained"] != base["lora"]
    # outliers_on=pretrained: both variants perturb the same (pretrained) outliers, 0.5 % of each matrix
    weight_rows = [r for r in result["perturbation"] if r["target"] == "weight"]
    assert len({r["perturbed"] for r in weight_rows}) == 1 and weight_rows[0]["perturbed"] > 0
    # every point was perturbed: no PPL equals its variant's unperturbed one (the tiny model is random,
    # so the direction of the change is not asserted)
    assert all(r["ppl"] != base[r["variant"]] for r in result["perturbation"])
    assert all(r["ppl_unperturbed"] == base[r["variant"]] for r in result["perturbation"])
    assert len(result["quantization"]) == 4
    assert {r["quantizer"] for r in result["quantization"]} == {"w8a8", "w4a8"}
    assert (out / "perturbation.png").stat().st_size > 0
    assert (out / "perturbation_vs_pretrained.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| pretrained | lora |" in report and "w4a8" in report
    assert "Validation perplexity under perturbation" in proc.stdout


CASES = {
    "unknown perturbation": (["perturb=[w_uniform_range,w_loud]"], "unknown perturb 'w_loud'"),
    "bad reference": (["perturb=w_uniform_range", "perturb.w_uniform_range.relative=row"], "relative='row' is not one of element, range"),
    "outliers on activations": (["perturb=a_uniform_range", "perturb.a_uniform_range.mask=outliers"], "mask=outliers marks weights"),
    "adapter without config": (["adapters={x:/nonexistent/adapter}"], "adapters.x=/nonexistent/adapter does not exist"),
    "nothing to do": (["perturb=none"], "nothing to analyze"),
    "bad clip ratio": (["perturb=none", "quant=w4a8", "quant.w4a8.activation.clip_ratio=2"], "quant.w4a8.activation.clip_ratio=2 must be in (0, 1]"),
}


@pytest.mark.parametrize("overrides,expected", CASES.values(), ids=CASES.keys())
def test_bad_input_gives_one_clear_line(tmp_path, overrides, expected):
    proc = run_in_process("analyze.py", tmp_path, *TINY, *overrides)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr[-2000:]


def test_eval_scores_w_a_quantizers_and_refuses_to_export_them(tmp_path):
    proc = run_in_process("eval.py", tmp_path / "ok", *EVAL_TINY, "quant=[w8a8,w4a16_cuberoot]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ppl = json.loads((tmp_path / "ok" / "metrics.json").read_text())["ppl"]["validation"]
    assert {"fp", "w8a8", "w4a16_cuberoot"} <= set(ppl)
    proc = run_in_process("eval.py", tmp_path / "bad", *EVAL_TINY, "quant=w4a8", f"export_dir={tmp_path / 'export'}")
    assert proc.returncode == 2
    assert "export_dir cannot hold w4a8" in proc.stderr
