"""The benchmark drivers: the study framework (resume, merge), the quality study's aggregation and figures, the cost
bench's helpers."""

from __future__ import annotations

import json
import math
import re
import sys

import pytest
from helpers import ROOT, run_entry, run_python

sys.path.insert(0, str(ROOT / "bench"))

import cost  # noqa: E402
import quality  # noqa: E402
import quality_rows  # noqa: E402
import render  # noqa: E402
import study  # noqa: E402
import study_corpora  # noqa: E402


def test_gap_closed_by_hand():
    # control: fp 10, rtn4 14 (gap 4); the row quantizes to 12 -> half the gap closed
    assert quality_rows.gap_closed(10.0, 14.0, 12.0) == pytest.approx(0.5)
    assert quality_rows.gap_closed(10.0, 14.0, 14.0) == pytest.approx(0.0)
    assert quality_rows.gap_closed(10.0, 14.0, 15.0) == pytest.approx(-0.25)
    assert math.isnan(quality_rows.gap_closed(10.0, 9.0, 9.5))  # no gap to close


def test_aggregate_pairs_seeds_with_the_control():
    cells = {
        "pretrained": {"-": {"wiki": {"fp": 13.0, "rtn4": 22.0, "gptq4": 21.0}}},
        "control": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0, "gptq4": 13.0}},
                    "1": {"wiki": {"fp": 12.0, "rtn4": 20.0, "gptq4": 15.0}}},
        "npft_fisher": {"0": {"wiki": {"fp": 10.0, "rtn4": 12.0, "gptq4": 13.0}},
                        "1": {"wiki": {"fp": 12.0, "rtn4": 18.0, "gptq4": 15.0}}},
    }
    agg = quality_rows.aggregate(cells, ["rtn4", "gptq4"])
    rtn4 = agg["table"]["wiki"]["npft_fisher"]["rtn4"]
    assert rtn4["mean"] == pytest.approx(15.0) and rtn4["std"] == pytest.approx(math.sqrt(18)) and rtn4["n"] == 2
    assert agg["table"]["wiki"]["pretrained"]["fp"]["n"] == 1
    derived = agg["derived"]["wiki"]["npft_fisher"]
    # gap closed per seed: (14-12)/4 = 0.5 and (20-18)/8 = 0.25
    assert derived["rtn4"]["gap_closed"]["mean"] == pytest.approx(0.375)
    # PPL change per seed: 12/14-1 and 18/20-1
    assert derived["rtn4"]["vs_control_pct"]["mean"] == pytest.approx(100 * ((12 / 14 - 1) + (18 / 20 - 1)) / 2)
    assert derived["fp"]["vs_control_pct"]["mean"] == pytest.approx(0.0)
    reach = agg["derived"]["wiki"]["rtn4_vs_pretrained_gptq4"]
    assert reach["npft_fisher"]["reaches"] is True and reach["pretrained"]["reaches"] is False
    assert "control" not in agg["derived"]["wiki"]


def test_rows_of_several_lengths_pair_with_the_control_of_the_same_length(tmp_path):
    cells = {
        "control@16": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0}}},
        "control@64": {"0": {"wiki": {"fp": 9.0, "rtn4": 13.0}}},
        "qerr_all@16": {"0": {"wiki": {"fp": 10.5, "rtn4": 13.0}}},
        "qerr_all@64": {"0": {"wiki": {"fp": 9.9, "rtn4": 11.0}}},
        "step_2@64": {"0": {"wiki": {"fp": 9.0, "rtn4": 12.0}}},
    }
    agg = quality_rows.aggregate(cells, ["rtn4"])
    derived = agg["derived"]["wiki"]
    assert set(derived) == {"qerr_all@16", "qerr_all@64", "step_2@64"}  # no control row, whatever its length
    assert derived["qerr_all@16"]["rtn4"]["gap_closed"]["mean"] == pytest.approx(0.25)  # (14-13)/(14-10)
    assert derived["qerr_all@64"]["rtn4"]["gap_closed"]["mean"] == pytest.approx(0.5)   # (13-11)/(13-9)
    assert derived["qerr_all@64"]["fp"]["vs_control_pct"]["mean"] == pytest.approx(10.0)
    assert quality_rows.control_of("qerr_all@64") == "control@64" and quality_rows.base_row("qerr_all@64") == "qerr_all"
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0], "default_row": "step_2@64", "deploy_row": "qerr_all@64"},
              "aggregate": agg}
    assert render.plot_gap_vs_steps(result, tmp_path / "steps.png").stat().st_size > 0
    assert render.plot_frontier(result, tmp_path / "frontier.png").stat().st_size > 0
    # one length only: there is no curve to draw
    single = {"settings": result["settings"], "aggregate": quality_rows.aggregate({k: v for k, v in cells.items() if "@64" in k}, ["rtn4"])}
    assert render.plot_gap_vs_steps(single, tmp_path / "none.png") is None


def test_config_difference_names_the_first_differing_key():
    a = {"noise": {"scale": 1.0, "distribution": {"_target_": "A"}}, "seed": 0}
    assert study.config_difference(a, json.loads(json.dumps(a))) is None
    b = {"noise": {"scale": 1.0, "distribution": {"_target_": "B"}}, "seed": 0}
    assert study.config_difference(a, b) == "noise.distribution._target_: 'A' vs 'B'"
    # an option added since the run was trained matches only at the value that trains as before it existed
    older = {"noise": {"scale": 1.0}}
    assert study.config_difference(older, {"noise": {"scale": 1.0, "placement": "random"}}) is None
    assert study.config_difference(older, {"noise": {"scale": 1.0, "placement": "last"}}) == "noise.placement: None vs 'last'"
    assert study.config_difference({"noise": {"scale": 1.0, "placement": "random"}}, older) is not None
    # the run folder and cache paths do not decide the adapter
    signature = study.train_signature({"trainer": {"max_steps": 2, "default_root_dir": "/x"}, "data": {"cache_dir": "/c", "seq_len": 4}})
    assert signature["trainer"] == {"max_steps": 2} and signature["data"] == {"seq_len": 4}


def test_a_control_is_the_control_whatever_its_recipe_s_noise_options():
    """Without noise, the schedule options and the outlier score train nothing: the quality study's control
    (experiment=npft_fisher) stands for the llama.cpp study's (experiment=npft_smollm2); with noise they differ."""
    base = ["model=tiny-llama", "seed=0", "trainer.max_steps=4", "optimizer.lr=2e-4"]
    fisher, smollm2 = ["experiment=npft_fisher"], ["experiment=npft_smollm2"]
    signature = lambda *o: study.expected_train_signature([*o, *base])  # noqa: E731
    assert study.config_difference(signature(*fisher, "noise=none"), signature(*smollm2, "noise=none")) is None
    assert study.config_difference(signature(*fisher, "noise=none"), signature(*smollm2, "noise=none", "curvature=null")) is None
    assert study.config_difference(signature(*fisher), signature(*smollm2)) is not None
    other_seed = study.expected_train_signature([*fisher, "noise=none", *base, "seed=1"])
    assert study.config_difference(signature(*fisher, "noise=none"), other_seed) == "data.seed: 0 vs 1"


def test_info_nodes_drop_headers_menus_and_indexes():
    text = ("preamble\n\x1f\nFile: py.info,  Node: Intro,  Next: B,  Up: Top\n\nIntro\n*****\n\nSome text.\n\n* Menu:\n\n* B::\n"
            "\x1f\nFile: py.info,  Node: Index,  Up: Top\n\n* a: 1.\n\x1f\nTag Table:\nNode: Intro\x7f1\n\x1f\nEnd Tag Table\n")
    assert list(study_corpora.info_nodes(text)) == [("Intro", "Intro\n*****\n\nSome text.")]


def test_results_block_is_replaced_in_place(tmp_path):
    path = tmp_path / "results.md"
    path.write_text("# Results\n\nintro\n\n" + render.BLOCK_BEGIN + "\nold\n" + render.BLOCK_END + "\n\n## Cost\nkept\n")
    study.write_results_block(path, render.BLOCK_BEGIN + "\nnew\n" + render.BLOCK_END, render.BLOCK_BEGIN, render.BLOCK_END)
    text = path.read_text()
    assert "new" in text and "old" not in text and text.startswith("# Results\n\nintro") and text.endswith("## Cost\nkept\n")


def test_ratio_row_and_missed_target():
    row = cost.ratio_row({"a": [1.2, 1.1, 5.0], "b": [1.0, 1.0, 1.0]}, "a", "b", 1.10)
    assert row["ratio"] == pytest.approx(1.2) and not row["met"] and row["missed_by_pct"] == pytest.approx(100 * 0.1 / 1.1)
    assert cost.ratio_row({"a": [0.96], "b": [1.0]}, "a", "b", 0.95, higher_is_better=True)["met"]


def test_mask_memory_counts_index_bytes(tiny_llama):
    from npft_lightning.core.layers import decoder_linears

    linears = decoder_linears(tiny_llama)
    result = cost.mask_memory(tiny_llama, linears, [1.0])
    row = result["rows"][0]
    expected = sum(max(1, round(lin.weight.numel() / 100)) for lin in linears.values())
    assert row["outliers"] == expected
    assert row["mask_bytes"] == expected * 4  # int32 indices
    assert row["pct_of_model_weight_bytes"] == pytest.approx(100 * expected * 4 / result["model_weight_bytes"])


def _with_rows(args: list[str], rows: list[str]) -> list[str]:
    """``args`` with the values of --rows replaced by ``rows``."""
    start = args.index("--rows") + 1
    end = next(i for i in range(start, len(args)) if args[i].startswith("--"))
    return [*args[:start], *rows, *args[end:]]


@pytest.mark.slow
def test_quality_study_end_to_end_on_tiny_llama(tmp_path):
    """Train control + NPFT, evaluate them and the pretrained model on two corpora, aggregate; a rerun runs nothing."""
    ood = tmp_path / "ood.txt"
    ood.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n\n" * 40)
    study_dir = tmp_path / "study"
    args = ["--model", "tiny-llama", "--rows", "pretrained", "control", "npft_fisher", "--seeds", "0",
            "--quantizers", "rtn4", "gptq4", "--steps", "2", "--max-eval-windows", "1", "--calib-windows", "2",
            "--eval-seq-len", "256", "--ood-text", str(ood), "--set", "data.seq_len=128",
            "--train-set", "outliers.calibration_windows=2", "--train-set", "outliers.calibration_length=128",
            "--eval-set", "calibration.length=128", "--study-dir", str(study_dir),
            "--out-json", str(tmp_path / "q.json"), "--results-md", str(tmp_path / "results.md"), "--plot", str(tmp_path / "q.png")]
    first = run_python(["bench/quality.py", *args], timeout=1800, OMP_NUM_THREADS="1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    # one eval process per model scores both corpora: pretrained eval + 2 × (train + eval)
    assert "cells: 5 run, 0 reused" in first.stdout
    result = json.loads((tmp_path / "q.json").read_text())
    assert set(result["cells"]) == {"pretrained", "control", "npft_fisher"}
    for row in ("control", "npft_fisher"):
        for corpus in ("wiki", "pydoc"):
            assert set(result["cells"][row]["0"][corpus]) == {"fp", "rtn4", "gptq4"}
    assert result["settings"]["reduced"] is True
    assert result["eval_split_of_corpus"] == {"wiki": "validation", "pydoc": "test"}
    # The in-domain column (the combined eval's `validation` split) is the Wikipedia test split as a plain
    # eval.py scores it through the wiki_vital data group: same text, same windows, same PPL.
    plain = run_entry("eval.py", tmp_path / "plain", "model=tiny-llama", "quant=[rtn4]", "splits=[test]", "data.seq_len=128",
                      "data.eval_seq_len=256", "data.max_eval_windows=1", "print_config=false", OMP_NUM_THREADS="1")
    assert plain.returncode == 0, plain.stderr[-2000:]
    plain_ppl = json.loads((tmp_path / "plain" / "metrics.json").read_text())["ppl"]["test"]
    assert result["cells"]["pretrained"]["-"]["wiki"]["fp"] == plain_ppl["fp"]
    assert result["cells"]["pretrained"]["-"]["wiki"]["rtn4"] == plain_ppl["rtn4"]
    text = (tmp_path / "results.md").read_text()
    assert "Reduced study" in text and "Python 3.11 manual" in text and "NPFT as first built, Fisher outliers (`experiment=npft_fisher`)" in text
    # each trained run's step clock: wall time and median batch time, and the ratio to the control in the table
    assert set(result["timing"]) == {"control", "npft_fisher"}
    assert 0 < result["timing"]["npft_fisher"]["0"]["median_batch_seconds"] < result["timing"]["npft_fisher"]["0"]["train_seconds"]
    assert re.search(r"\| NPFT as first built, Fisher outliers \(`experiment=npft_fisher`\) \| [0-9.]+ \| [0-9]\.[0-9]{3} \| [0-9.]+ \|", text)
    assert (tmp_path / "q.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    second = run_python(["bench/quality.py", *args], OMP_NUM_THREADS="1")
    assert second.returncode == 0 and "cells: 0 run, 5 reused" in second.stdout
    assert json.loads((tmp_path / "q.json").read_text())["cells"] == result["cells"]

    # a row not trained yet: --finished-only writes the tables of what exists and runs nothing
    partial = run_python(["bench/quality.py", *_with_rows(args, ["pretrained", "control", "npft_fisher", "qerr_all"]), "--finished-only"],
                         OMP_NUM_THREADS="1")
    assert partial.returncode == 0 and "cells: 0 run, 5 reused" in partial.stdout, partial.stderr[-2000:]
    assert set(json.loads((tmp_path / "q.json").read_text())["cells"]) == {"pretrained", "control", "npft_fisher"}
    assert not (study_dir / "qerr_all").exists()

    # a trained run of another config cannot stand in for the control
    bad = run_python(["bench/quality.py", *args, "--reuse", f"control:0={study_dir / 'npft_fisher' / 'seed0' / 'train'}"],
                     OMP_NUM_THREADS="1")
    assert bad.returncode == 2 and "noise.distribution._target_" in bad.stderr


def test_quality_plot_draws_a_bar_per_row_and_column(tmp_path, monkeypatch):
    cells = {
        "control": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0}}, "1": {"wiki": {"fp": 12.0, "rtn4": 20.0}}},
        "npft_fisher": {"0": {"wiki": {"fp": 10.5, "rtn4": 12.0}}, "1": {"wiki": {"fp": 12.2, "rtn4": 18.0}}},
        "npft_pqi": {"0": {"wiki": {"fp": 10.1, "rtn4": 13.0}}, "1": {"wiki": {"fp": 12.1, "rtn4": 19.0}}},
    }
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0, 1]}, "aggregate": quality_rows.aggregate(cells, ["rtn4"])}
    from npft_lightning.tasks import figures as project_io

    heights, save = [], project_io.save_figure

    def spy(fig, path, dpi=120):
        heights.extend(patch.get_height() for ax in fig.axes for patch in ax.patches)
        return save(fig, path, dpi)

    monkeypatch.setattr(project_io, "save_figure", spy)
    path = render.plot_quality(result, tmp_path / "q.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    # 2 NPFT rows × 2 columns; each height is the row's paired mean PPL change against the control, in %
    expected = [100 * ((10.5 / 10 - 1) + (12.2 / 12 - 1)) / 2, 100 * ((12 / 14 - 1) + (18 / 20 - 1)) / 2,
                100 * ((10.1 / 10 - 1) + (12.1 / 12 - 1)) / 2, 100 * ((13 / 14 - 1) + (19 / 20 - 1)) / 2]
    assert heights == pytest.approx(expected)
    # nothing to compare without an NPFT row
    only_control = {"settings": {"quantizers": ["rtn4"], "seeds": [0]}, "aggregate": quality_rows.aggregate({"control": cells["control"]}, ["rtn4"])}
    assert render.plot_quality(only_control, tmp_path / "none.png") is None


Q4_0_TARGET = ["quant=[q4_0]", "noise.distribution.quantizer=${quant.q4_0}"]


@pytest.mark.parametrize("recipe,row,steps,target", [([], "qerr_all_mix0.15", 256, []), (["experiment=qat_rtn4"], "qerr_all", 256, []),
                                                    (["experiment=mixed_rtn4"], "qerr_all_mix0.15", 256, []),
                                                    (["experiment=mixed_q4_0"], "qerr_all_mix0.15", 256, Q4_0_TARGET),
                                                    (["experiment=npft_fisher"], "npft_fisher", None, [])])
def test_recipes_train_what_the_study_measured(recipe, row, steps, target):
    """train.py's default (npft_smollm2), qat_rtn4 and mixed_rtn4 train exactly the final study's row at its lr 2e-4
    and length; mixed_q4_0 is that row aimed at ggml's Q4_0 grid, as measured in docs/gguf_llamacpp.md; npft_fisher
    is the study's base itself."""
    trained = study.expected_train_signature(recipe)
    length = [] if steps is None else ["optimizer.lr=2e-4", f"trainer.max_steps={steps}"]
    measured = [*quality_rows.STUDY_BASE, *quality_rows.ROWS[row], *length]
    assert study.config_difference(trained, study.expected_train_signature([*measured, *target])) is None
    if target:  # the target quantizer is what differs from the row as the study ran it
        assert "noise" in (study.config_difference(trained, study.expected_train_signature(measured)) or "")
    if steps is not None:  # the row's own length and lr are not the base's
        assert study.config_difference(trained, study.expected_train_signature([*quality_rows.STUDY_BASE, *quality_rows.ROWS[row]])) is not None


def _fake_evals(ppl: dict[tuple[str, int | None], tuple[float, float]]):
    """A ``run_plan`` stand-in: every eval of the plan "finished" with the validation PPL given for its (row, seed):
    (fp, rtn4) or (fp, rtn4, gptq4)."""
    def run_plan(plan, lock, dry_run, desc, finished_only=False):
        evals = [(step, {"ppl": {"validation": {**dict(zip(("fp", "rtn4", "gptq4"), ppl[step["row"], step["seed"]])), "_tokens": 16384}}})
                 for step in plan if step["kind"] == "eval" and (step["row"], step["seed"]) in ppl]
        return evals, len(evals), 0, []
    return run_plan


def test_merge_joins_an_earlier_study_of_another_length(tmp_path, monkeypatch, capsys):
    """A 64-step study merged with an earlier 16-step one: one table with both lengths, paired per length, and the
    steps plot; the earlier command is quoted; a study measured otherwise is refused with one line."""
    common = ["--corpora", "wiki_val", "--quantizers", "rtn4", "--max-eval-windows", "8", "--train-set", "optimizer.lr=2e-4"]
    out = lambda name: ["--study-dir", str(tmp_path / name), "--out-json", str(tmp_path / f"{name}.json"),  # noqa: E731
                        "--results-md", str(tmp_path / f"{name}.md"), "--plot", str(tmp_path / f"{name}.png")]
    monkeypatch.setattr(quality, "run_plan", _fake_evals({("pretrained", None): (14.0, 24.0), ("control", 0): (13.0, 22.0),
                                                          ("qerr_all", 0): (13.5, 19.0)}))
    assert quality.main(["--rows", "pretrained", "control", "qerr_all", "--seeds", "0", "--steps", "16", *common, *out("early")]) == 0
    monkeypatch.setattr(quality, "run_plan", _fake_evals({("control", 0): (12.0, 20.0), ("qerr_all", 0): (13.0, 16.0)}))
    assert quality.main(["--rows", "control", "qerr_all", "--seeds", "0", "--steps", "64", *common, *out("late"),
                         "--merge", str(tmp_path / "early.json")]) == 0
    result = json.loads((tmp_path / "late.json").read_text())
    assert set(result["cells"]) == {"pretrained", "control@16", "qerr_all@16", "control@64", "qerr_all@64"}
    derived = result["aggregate"]["derived"]["wiki_val"]
    assert derived["qerr_all@16"]["rtn4"]["gap_closed"]["mean"] == pytest.approx(3 / 9)  # (22-19)/(22-13)
    assert derived["qerr_all@64"]["rtn4"]["gap_closed"]["mean"] == pytest.approx(0.5)    # (20-16)/(20-12)
    assert result["settings"]["steps"] == [16, 64] and result["settings"]["rows"] == ["control", "qerr_all", "pretrained"]
    text = (tmp_path / "late.md").read_text()
    assert f"with the cells of `{tmp_path / 'early.json'}`" in text and "--steps 16" in text
    assert (tmp_path / "late_steps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a cell measured here wins over the earlier copy of it
    monkeypatch.setattr(quality, "run_plan", _fake_evals({("control", 0): (12.5, 21.0)}))
    assert quality.main(["--rows", "control", "--seeds", "0", "--steps", "16", *common, *out("again"), "--merge", str(tmp_path / "early.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["cells"]["control@16"]["0"]["wiki_val"]["fp"] == 12.5
    # a merge of a merge keeps every command that made its cells
    assert quality.main(["--rows", "control", "--seeds", "0", "--steps", "64", *common, *out("chain"), "--merge", str(tmp_path / "late.json")]) == 0
    chain = json.loads((tmp_path / "chain.json").read_text())["settings"]["merged"]
    assert [m["json"] for m in chain] == [str(tmp_path / "early.json"), str(tmp_path / "late.json")]
    # a study merged into itself run after run (seed by seed, --merge X --out-json X) lists each command once,
    # and not the command that wrote it
    itself = ["--rows", "control", "--seeds", "0", "--steps", "64", *common, *out("chain"), "--merge", str(tmp_path / "chain.json")]
    for _ in range(2):
        assert quality.main(itself) == 0
    again = json.loads((tmp_path / "chain.json").read_text())
    assert [m["json"] for m in again["settings"]["merged"]] == [str(tmp_path / "early.json"), str(tmp_path / "late.json"),
                                                               str(tmp_path / "chain.json")]
    assert len({m["command"] for m in again["settings"]["merged"]} | {again["command"]}) == 4
    assert (tmp_path / "chain.md").read_text().count("made by:") == 3

    # measured with other windows: not one table
    other = [*common[:5], "4", *common[6:]]
    assert quality.main(["--rows", "control", "--seeds", "0", "--steps", "64", *other, *out("bad"), "--merge", str(tmp_path / "early.json")]) == 2
    assert not (tmp_path / "bad.json").exists()
    assert "its max_eval_windows is 8, this study's 4" in capsys.readouterr().err
    assert quality.main(["--rows", "control", "--seeds", "0", "--steps", "64", *common, *out("bad"), "--merge", str(tmp_path / "early.md")]) == 2
    assert "cannot read it" in capsys.readouterr().err


def test_the_paper_recipe_row_runs_the_recipe_and_pairs_with_its_own_control(tmp_path, monkeypatch):
    """paper_recipe runs experiment=npft_paper as configured (no study base, --steps or --train-set: they would
    change its lr and length), once per seed in a study of several lengths, and is compared with a control trained
    the same way, not with the study's control."""
    planned = []

    def run_plan(plan, lock, dry_run, desc, finished_only=False):
        planned.extend(plan)
        return _fake_evals({("control@16", 0): (12.0, 20.0), ("control@64", 0): (11.0, 19.0),
                            ("paper_recipe_control", 0): (13.0, 21.0), ("paper_recipe", 0): (13.2, 20.0)})(plan, lock, dry_run, desc)

    monkeypatch.setattr(quality, "run_plan", run_plan)
    out = ["--study-dir", str(tmp_path / "s"), "--out-json", str(tmp_path / "s.json"), "--results-md", str(tmp_path / "s.md"),
           "--plot", str(tmp_path / "s.png")]
    assert quality.main(["--rows", "control", "paper_recipe", "paper_recipe_control", "--seeds", "0", "--steps", "16", "64",
                         "--corpora", "wiki_val", "--quantizers", "rtn4", "--train-set", "optimizer.lr=2e-4", *out]) == 0
    trains = {step["row"]: step for step in planned if step["kind"] == "train"}
    assert sorted(trains) == ["control@16", "control@64", "paper_recipe", "paper_recipe_control"]  # the recipe rows once
    for row in ("paper_recipe", "paper_recipe_control"):
        overrides = trains[row]["overrides"]
        assert "experiment=npft_paper" in overrides and "experiment=npft_fisher" not in overrides
        assert "optimizer.lr=2e-4" not in overrides and not any(o.startswith("trainer.max_steps") for o in overrides)
    assert "optimizer.lr=2e-4" in trains["control@64"]["overrides"]
    # the overrides compose into the paper's recipe (a second experiment= would not compose at all)
    signature = study.expected_train_signature(trains["paper_recipe"]["overrides"])
    assert study.config_difference(signature, study.expected_train_signature(["experiment=npft_paper", "seed=0"])) is None
    derived = json.loads((tmp_path / "s.json").read_text())["aggregate"]["derived"]["wiki_val"]
    assert "paper_recipe_control" not in derived
    assert derived["paper_recipe"]["rtn4"]["gap_closed"]["mean"] == pytest.approx((21 - 20) / (21 - 13))
    assert derived["paper_recipe"]["fp"]["vs_control_pct"]["mean"] == pytest.approx(100 * (13.2 / 13 - 1))


def test_study_lock_is_an_flock_other_jobs_see(tmp_path):
    """--lock holds an exclusive flock on the file for the cell: a job that flocks the same file (another study,
    `flock(1)`) cannot take it meanwhile, and can once the cell is done."""
    import fcntl

    lock = tmp_path / "machine.lock"
    with open(lock, "a") as other:
        with study.held(str(lock)):
            with pytest.raises(BlockingIOError):
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
        fcntl.flock(other, fcntl.LOCK_UN)
    with study.held(None):  # no --lock: nothing to hold
        pass


def _drawn_figures(monkeypatch) -> list:
    """The figures the plot functions hand to save_figure, kept open for the test to read."""
    from npft_lightning.tasks import figures as project_io

    drawn, save = [], project_io.save_figure

    def spy(fig, path, dpi=120):
        drawn.append({"title": fig._suptitle.get_text() if fig._suptitle else "", "axes": [
            {"title": ax.get_title(), "ylim": ax.get_ylim(), "xlim": ax.get_xlim(), "ylabel": ax.get_ylabel(),
             "legend": [t.get_text() for t in ax.get_legend().get_texts()] if ax.get_legend() else [],
             "hlines": [seg[0][1] for c in ax.collections if hasattr(c, "get_segments") for seg in c.get_segments()
                        if len(seg) == 2 and seg[0][1] == seg[1][1]] + [ln.get_ydata()[0] for ln in ax.lines if len(set(ln.get_ydata())) == 1],
             "vlines": [ln.get_xdata()[0] for ln in ax.lines if len(set(ln.get_xdata())) == 1]} for ax in fig.axes]})
        return save(fig, path, dpi)

    monkeypatch.setattr(project_io, "save_figure", spy)
    return drawn


def test_figures_follow_the_plot_rules(tmp_path, monkeypatch):
    """Small effects keep their size (the PPL axis spans at least ±2 %, the gap axis 0 to 1, fractions as the tables
    print them), the control and the +1 % unquantized budget are drawn, and a single-seed figure says so on itself."""
    one_seed = {"control@16": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0}}}, "control@64": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0}}},
                "qerr_all@16": {"0": {"wiki": {"fp": 10.03, "rtn4": 13.9}}}, "qerr_all@64": {"0": {"wiki": {"fp": 10.05, "rtn4": 13.8}}}}
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0]}, "aggregate": quality_rows.aggregate(one_seed, ["rtn4"])}
    drawn = _drawn_figures(monkeypatch)
    render.plot_quality(result, tmp_path / "q.png")
    render.plot_gap_vs_steps(result, tmp_path / "s.png")
    render.plot_frontier(result, tmp_path / "f.png")
    bars, steps, frontier = drawn
    assert "SINGLE SEED (seed 0)" in bars["title"]
    assert all("SINGLE SEED (seed 0)" in fig["axes"][0]["title"] for fig in (steps, frontier))
    low, high = bars["axes"][0]["ylim"]
    assert low <= -2 and high >= 2  # a 0.3 % bar is not a cliff
    assert 0 in bars["axes"][0]["hlines"] and render.BUDGET_PCT in bars["axes"][0]["hlines"]
    assert any("+1 % unquantized" in text for text in bars["axes"][0]["legend"])
    for fig in (steps, frontier):
        low, high = fig["axes"][0]["ylim"]
        assert low <= 0 and high >= 1 and "fraction" in fig["axes"][0]["ylabel"]
        assert 0 in fig["axes"][0]["hlines"]
    assert {0, render.BUDGET_PCT} <= set(frontier["axes"][0]["vlines"])

    # several seeds: error bars, and the row with one seed marked
    cells = {"control": {"0": {"wiki": {"fp": 10.0, "rtn4": 14.0}}, "1": {"wiki": {"fp": 11.0, "rtn4": 15.0}}},
             "qerr_all": {"0": {"wiki": {"fp": 10.5, "rtn4": 12.0}}, "1": {"wiki": {"fp": 11.4, "rtn4": 13.5}}},
             "npft_paper": {"0": {"wiki": {"fp": 15.0, "rtn4": 20.0}}}}
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0, 1]}, "aggregate": quality_rows.aggregate(cells, ["rtn4"])}
    render.plot_quality(result, tmp_path / "q2.png")
    assert "± std over 2 seeds" in drawn[-1]["title"] and "SINGLE SEED" not in drawn[-1]["title"]
    assert any(text.endswith("(1 seed)") and "paper" in text for text in drawn[-1]["axes"][0]["legend"])
    # a row with fewer seeds than the others, but more than one, says how many
    three = {row: {**seeds, "2": seeds["1"]} for row, seeds in cells.items() if row != "npft_paper"}
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0, 1, 2]},
              "aggregate": quality_rows.aggregate({**three, "npft_paper": {**cells["npft_paper"], "1": cells["npft_paper"]["0"]}}, ["rtn4"])}
    render.plot_quality(result, tmp_path / "q3.png")
    assert "± std over 3 seeds (a marked row: over its own seeds)" in drawn[-1]["title"]
    legend = drawn[-1]["axes"][0]["legend"]
    assert any(text.endswith("(2 seeds)") and "paper" in text for text in legend)
    assert not any(text.endswith("seeds)") for text in legend if "paper" not in text)

    # a row label longer than the figure is wide is wrapped, so that the 2-column legend stays inside it
    long = {"control": cells["control"], "qerr_all_mix0.15_kd_self_w0.5": cells["qerr_all"]}
    result = {"settings": {"quantizers": ["rtn4"], "seeds": [0, 1]}, "aggregate": quality_rows.aggregate(long, ["rtn4"])}
    render.plot_quality(result, tmp_path / "q3.png")
    label = quality_rows.row_label("qerr_all_mix0.15_kd_self_w0.5")
    assert len(label) > render.LEGEND_LINE_CHARS // 2
    legend = drawn[-1]["axes"][0]["legend"]
    assert max(len(line) for text in legend for line in text.splitlines()) <= render.LEGEND_LINE_CHARS // 2
    assert any(text.replace("\n", " ") == label for text in legend)


@pytest.mark.parametrize("experiment", ["npft_smollm2", "npft_fisher", "mixed_q4_0", "qat_rtn4"])
def test_the_neutral_values_of_added_options_are_the_recipes_defaults(experiment):
    """A run trained before an option existed matches a config at that option's neutral value; each neutral value
    must be what the recipes that do not use the option compose to, or old runs would be matched to another recipe."""
    signature = study.expected_train_signature([f"experiment={experiment}"])
    checked = 0
    for dotted, neutral in study.NEUTRAL_ADDED_OPTIONS.items():
        *parents, leaf = dotted.split(".")
        node = signature
        for part in parents:
            node = node[part]
        if leaf in node:  # absent where the recipe's noise kind has no such option (then absent matches absent)
            assert node[leaf] == neutral, dotted
            checked += 1
    assert checked >= 5


def test_reach_of_pretrained_gptq4_is_said_only_with_a_trained_row(tmp_path, monkeypatch):
    """The "RTN-4 after training vs GPTQ-4 on the pretrained model" line names the trained rows; a table of the
    pretrained row alone (a study's first cell) has no such line, not an empty one."""
    monkeypatch.setattr(quality, "run_plan", _fake_evals({("pretrained", None): (14.0, 24.0, 18.0), ("control", 0): (13.0, 22.0, 17.0)}))
    common = ["--seeds", "0", "--steps", "16", "--corpora", "wiki_val", "--quantizers", "rtn4", "gptq4", "--max-eval-windows", "8"]
    for name, rows in (("alone", ["pretrained"]), ("trained", ["pretrained", "control"])):
        assert quality.main(["--rows", *rows, *common, "--study-dir", str(tmp_path / name), "--out-json", str(tmp_path / f"{name}.json"),
                             "--results-md", str(tmp_path / f"{name}.md"), "--plot", str(tmp_path / f"{name}.png")]) == 0
    assert "after training vs GPTQ-4" not in (tmp_path / "alone.md").read_text()
    line = next(x for x in (tmp_path / "trained.md").read_text().splitlines() if "after training vs GPTQ-4" in x)
    assert "(18.00)" in line and "22.00 (does not)" in line
