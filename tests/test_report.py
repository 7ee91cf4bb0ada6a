"""The sweep report: swept keys from Hydra's overrides, the control marked, Markdown + CSV + PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from npft_lightning.core.errors import UserError
from npft_lightning.tasks.report import (
    load_sweep,
    main,
    parse_overrides,
    print_summary,
    swept_keys,
    write_sweep_report,
)


def fake_job(root: Path, num: int, overrides: list[str], scale: float, after: dict[str, float] | None, none: bool = False) -> None:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if after is None:
        return  # an unfinished job
    noise = {"scale": scale, "distribution": {"_target_": "npft_lightning.npft.noise." + ("NoNoise" if none else "UniformStepNoise")}}
    metrics = {"ppl": {"before": {"fp": 20.0, "rtn4": 30.0}, "after": after},
               "curvature": {"before": {"curvature_outliers": 5.0}, "after": {"curvature_outliers": 4.0}},
               "config": {"noise": noise}}
    (job / "metrics.json").write_text(json.dumps(metrics))


def make_sweep(root: Path) -> None:
    common = ["model=tiny-llama", "trainer.max_steps=2"]
    for num, scale in enumerate([0, 0.5, 2]):
        fake_job(root, num, [*common, f"noise.scale={scale}"], scale, {"fp": 19.0 + scale, "rtn4": 26.0 - scale})
    fake_job(root, 3, [*common, "noise.scale=4"], 4, None)


def test_swept_keys_values_and_control(tmp_path):
    make_sweep(tmp_path)
    jobs = load_sweep(tmp_path)
    assert [j.name for j in jobs] == ["0", "1", "2", "3"]
    assert swept_keys(jobs) == ["noise.scale"]
    assert [j.control for j in jobs] == [True, False, False, False]
    assert parse_overrides(["+noise.scale=0.25", "optimizer.lr=1e-3", "noise=none", "quant=[rtn4,rtn3_g32]", "~curvature"]) == {
        "noise.scale": 0.25, "optimizer.lr": 0.001, "noise": "none", "quant": "[rtn4,rtn3_g32]", "curvature": None}


def test_an_override_hydra_cannot_parse_is_one_line(tmp_path):
    fake_job(tmp_path, 0, ["noise.scale=0.5", "noise.scale=[1,"], 0.5, {"fp": 19.0})
    with pytest.raises(UserError, match=r"overrides.yaml holds an override Hydra cannot parse .*rerun that job"):
        load_sweep(tmp_path)


def test_report_writes_markdown_csv_and_plot(tmp_path):
    make_sweep(tmp_path)
    files = write_sweep_report(tmp_path)
    rows = list(csv.DictReader(files["csv"].open()))
    assert [r["noise.scale"] for r in rows] == ["0", "0.5", "2", "4"]
    assert [r["control"] for r in rows] == ["True", "False", "False", ""]
    assert float(rows[1]["ppl_after/rtn4"]) == 25.5 and float(rows[1]["ppl_before/fp"]) == 20.0
    assert rows[3]["ppl_after/fp"] == ""  # the unfinished job is listed, without numbers
    md = files["md"].read_text()
    assert "| job | noise.scale | control | unquantized after | rtn4 after |" in md
    assert "**control**" in md and "jobs 3" in md
    png = files["plot:noise.scale"]
    assert png.name == "ppl_vs_noise.scale.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_and_a_group_sweep_with_a_categorical_axis(tmp_path, capsys):
    common = ["model=tiny-llama"]
    fake_job(tmp_path, 0, [*common, "noise=none"], 0.0, {"fp": 19.0, "rtn4": 27.0}, none=True)
    fake_job(tmp_path, 1, [*common, "noise=uniform_step"], 1.0, {"fp": 19.5, "rtn4": 25.0})
    main([str(tmp_path), "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert "| 0 | none | **control** |" in out
    assert (tmp_path / "report" / "ppl_vs_noise.png").is_file()


def test_print_summary_still_prints_the_run_table(capsys):
    print_summary({"ppl": {"before": {"fp": 20.0, "rtn4": 30.0}, "after": {"fp": 19.0, "rtn4": 25.0}}})
    out = capsys.readouterr().out
    assert "unquantized" in out and "-16.67 %" in out
