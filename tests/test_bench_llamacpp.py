"""bench/llamacpp_study.py: the derived numbers on hand-made PPLs, resume and the reuse of a training queue's runs
with fake cells, the figure; end to end on a tiny model (slow, needs the llamacpp extra)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gguf_llamacpp  # noqa: E402
import gptq_llamacpp  # noqa: E402
import llamacpp_render  # noqa: E402
import llamacpp_rows  # noqa: E402
import llamacpp_study  # noqa: E402
import study  # noqa: E402

COLUMNS = ["Q4_0", "Q4_0+imatrix", "Q8_0"]


def test_columns_become_eval_file_types():
    assert llamacpp_rows.file_types(llamacpp_rows.COLUMNS) == (["Q4_0", "Q4_K_M", "IQ4_XS", "Q5_K_M", "Q8_0"], "both")
    assert llamacpp_rows.file_types(["Q4_0+imatrix", "IQ4_XS+imatrix"]) == (["Q4_0", "IQ4_XS"], True)
    assert [llamacpp_rows.column_label(c) for c in ("q4_k_m+IMATRIX", "q8_0", "IQ4_XS+imatrix")] == ["Q4_K_M+imatrix", "Q8_0", "IQ4_XS+imatrix"]
    assert llamacpp_rows.file_types(["Q4_0", "Q8_0"]) == (["Q4_0", "Q8_0"], False)
    assert llamacpp_rows.imatrix_pairs(llamacpp_rows.COLUMNS) == ["Q4_0", "Q4_K_M"]  # IQ4_XS only with, Q5_K_M / Q8_0 only without


def test_derived_numbers_by_hand():
    cells = {
        "pretrained": {"-": {"wiki": {"F32": 13.0, "Q4_0": 16.0, "Q4_0+imatrix": 14.5, "Q8_0": 13.1}}},
        "control": {"0": {"wiki": {"F32": 10.0, "Q4_0": 14.0, "Q4_0+imatrix": 12.0, "Q8_0": 10.1}},
                    "1": {"wiki": {"F32": 12.0, "Q4_0": 20.0, "Q4_0+imatrix": 16.0, "Q8_0": 12.0}}},
        "mixed_q4_0": {"0": {"wiki": {"F32": 10.5, "Q4_0": 11.0, "Q4_0+imatrix": 10.8, "Q8_0": 10.6}},
                       "1": {"wiki": {"F32": 12.0, "Q4_0": 18.0, "Q4_0+imatrix": 17.0, "Q8_0": 12.0}}},
    }
    agg = llamacpp_rows.aggregate(cells, COLUMNS)
    assert agg["table"]["wiki"]["control"]["Q4_0"]["mean"] == pytest.approx(17.0) and agg["table"]["wiki"]["control"]["Q4_0"]["n"] == 2
    row = agg["derived"]["wiki"]["mixed_q4_0"]
    # gap closed at Q4_0 per seed: (14-11)/(14-10) = 0.75, (20-18)/(20-12) = 0.25; at Q4_0+imatrix: (12-10.8)/2 = 0.6, (16-17)/4 = -0.25
    assert row["gap_closed"]["Q4_0"]["mean"] == pytest.approx(0.5) and row["gap_closed"]["Q4_0"]["n"] == 2
    assert row["gap_closed"]["Q4_0+imatrix"]["mean"] == pytest.approx((0.6 - 0.25) / 2)
    assert row["gap_closed"]["Q8_0"]["n"] == 1  # seed 1's control has no Q8_0 gap to close
    # the recipe's Q4_0 file against the control's Q4_0+imatrix file: 11/12 and 18/16
    assert row["vs_control_imatrix_pct"]["Q4_0"]["mean"] == pytest.approx(100 * ((11 / 12 - 1) + (18 / 16 - 1)) / 2)
    # what the imatrix adds to the recipe: 10.8/11 and 17/18; to the control 12/14, 16/20; to the pretrained model 14.5/16
    assert row["imatrix_gain_pct"]["Q4_0"]["mean"] == pytest.approx(100 * ((10.8 / 11 - 1) + (17 / 18 - 1)) / 2)
    assert agg["derived"]["wiki"]["control"]["imatrix_gain_pct"]["Q4_0"]["mean"] == pytest.approx(100 * ((12 / 14 - 1) + (16 / 20 - 1)) / 2)
    assert agg["derived"]["wiki"]["pretrained"]["imatrix_gain_pct"]["Q4_0"]["mean"] == pytest.approx(100 * (14.5 / 16 - 1))
    # the unquantized cost: F32 against the control's F32, 10.5/10 and 12/12
    assert row["vs_control_pct"]["F32"]["mean"] == pytest.approx(2.5)
    assert "gap_closed" not in agg["derived"]["wiki"]["control"] and "gap_closed" not in agg["derived"]["wiki"]["pretrained"]


@pytest.mark.parametrize("row", [r for r, overrides in llamacpp_rows.ROWS.items() if overrides])
def test_every_row_composes_into_a_valid_training_config(row, tmp_path):
    """A row's overrides are ones train.py takes (a misspelt key or a bad value fails here, not hours into a study)."""
    from npft_lightning.tasks.checks import validate_config

    cfg = compose("train", *llamacpp_rows.train_overrides(row, 0, None, [], []), f"paths.output_dir={tmp_path}")
    validate_config(cfg, "train")
    for override in llamacpp_rows.ROWS[row]:
        key, value = override.split("=", 1)
        if "." in key:  # a value (a group choice, experiment=… or noise=none, is a config of its own)
            assert str(OmegaConf.select(cfg, key)) == value, override


def test_qat75_q4_k_imatrix_trains_what_its_study_row_measured():
    """experiment=qat75_q4_k_imatrix trains exactly the study row of that name (qat_q4_k_imatrix on 3/4 of the steps)."""
    named = study.expected_train_signature(["experiment=qat75_q4_k_imatrix"])
    assert study.config_difference(named, study.expected_train_signature(llamacpp_rows.ROWS["qat75_q4_k_imatrix"])) is None
    assert study.config_difference(named, study.expected_train_signature(["experiment=qat_q4_k_imatrix"])) is not None


def test_queue_runs_have_the_study_rows_training_config():
    """The training queue's commands (validation-only overrides aside) train what the study's rows train."""
    queue = {"control": ["experiment=npft_smollm2", "noise=none", "quant=none", "seed=0", "curvature=null", "data.max_eval_windows=1"],
             "default": ["seed=0"],
             "mixed_q4_0": ["experiment=mixed_q4_0", "seed=0", "curvature=null", "data.max_eval_windows=1"]}
    common = ["model=smollm2-135m", "data.eval_seq_len=2048"]
    for row, overrides in queue.items():
        expected = study.expected_train_signature(llamacpp_rows.train_overrides(row, 0, None, common, []))
        assert study.config_difference(study.expected_train_signature(overrides), expected) is None, row
    # a recipe whose noise targets its quant group (${quant.q4_0}) keeps its quant when the study trains it
    assert "quant=none" not in study.validation_overrides(["experiment=mixed_q4_0"])
    assert study.validation_overrides(["experiment=npft_smollm2", "noise=none"]) == study.TRAIN_FIXED


# --------------------------------------------------------------------------------------------
# The driver with fake cells
# --------------------------------------------------------------------------------------------

# The llama.cpp PPL of each row's files on the Wikipedia test split (F32, Q4_0, Q4_0+imatrix, Q8_0).
FAKE_PPL = {"pretrained": (13.0, 16.0, 14.5, 13.1), "control": (10.0, 14.0, 12.0, 10.1), "default": (10.1, 12.0, 11.0, 10.2)}


def _value(command: list[str], key: str) -> str | None:
    return next((c.split("=", 1)[1] for c in command if c.startswith(key + "=")), None)


class FakeCells:
    """A ``run_cell`` stand-in: train.py writes a finished run of its config, eval.py a llama.cpp metrics.json with
    the PPLs of ``FAKE_PPL`` (the row read from the adapter path) and a GGUF file."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def __call__(self, command, log, lock):
        self.commands.append(command)
        out = Path(_value(command, "hydra.run.dir"))
        out.mkdir(parents=True, exist_ok=True)
        if command[1] == "train.py":
            overrides = [c for c in command[2:] if not c.startswith("hydra.")]
            _write_run(out, study.expected_train_signature(overrides))
            return
        adapter = _value(command, "adapter")
        row = "pretrained" if adapter is None else next(r for r in FAKE_PPL if f"/{r}" in adapter)
        labels = ["F32", "Q4_0", "Q4_0+imatrix", "Q8_0"]
        gguf = Path(_value(command, "gguf_out"))
        gguf.with_name("m-F32.gguf").write_bytes(b"GGUF")
        reports = {label: {"bits_per_weight": 4.5 + i, "bits_per_weight_linears": 4.0 + i, "bytes": 1000 * (i + 1),
                           "splits": {"test": {"ppl": ppl, "tokens": 100, "tokens_per_s": 50.0}}}
                   for i, (label, ppl) in enumerate(zip(labels, FAKE_PPL[row]))}
        (out / "metrics.json").write_text(json.dumps({"ppl": {"test": {"fp": FAKE_PPL[row][0] * 1.0001}},
                                                      "llamacpp": {**reports, "imatrix": {"path": "x"}}}))


def _write_run(folder: Path, config: dict) -> None:
    (folder / "adapter").mkdir(parents=True, exist_ok=True)
    (folder / "adapter" / "adapter_config.json").write_text("{}")
    (folder / "metrics.json").write_text(json.dumps({"config": config}))


def _args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--model", "tiny-llama", "--rows", "pretrained", "control", "default", "--seeds", "0", "--corpora", "wiki",
            "--columns", *COLUMNS, "--steps", "2", "--eval-seq-len", "128", "--study-dir", str(tmp_path / "study"),
            "--out-json", str(tmp_path / "l.json"), "--results-md", str(tmp_path / "l.md"), "--plot", str(tmp_path / "l.png"), *extra]


def test_study_resumes_and_derives_from_its_cells(tmp_path, monkeypatch, capsys):
    fake = FakeCells()
    monkeypatch.setattr(study, "run_cell", fake)
    assert llamacpp_study.main(_args(tmp_path)) == 0
    assert [c[1] for c in fake.commands] == ["eval.py", "train.py", "eval.py", "train.py", "eval.py"]
    assert "cells: 5 run, 0 reused" in capsys.readouterr().out
    evals = [c for c in fake.commands if c[1] == "eval.py"]
    for command in evals:
        assert {"quant=none", "llamacpp_types=[Q4_0,Q8_0]", "imatrix=both", "data.max_eval_windows=8"} <= set(command)
    # the GGUF files of a finished cell are deleted (metrics.json keeps their sizes and scores)
    assert not list((tmp_path / "study").rglob("*.gguf"))
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["cells"]["control"]["0"]["wiki"]["Q4_0"] == 14.0
    assert result["aggregate"]["derived"]["wiki"]["default"]["gap_closed"]["Q4_0"]["mean"] == pytest.approx(0.5)  # (14-12)/(14-10)
    assert result["file_sizes"]["Q8_0"]["bits_per_weight"] == pytest.approx(7.5)
    text = (tmp_path / "l.md").read_text()
    assert "**Reduced study.**" in text and "Q4_0 vs control Q4_0+imatrix" in text and "within 0.010 %" in text
    assert re.search(r"\| default recipe \(mixed, RTN-4\) \| 0\.50 \| ", text)
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # a rerun runs nothing
    fake.commands.clear()
    assert llamacpp_study.main(_args(tmp_path)) == 0
    assert fake.commands == [] and "cells: 0 run, 5 reused" in capsys.readouterr().out
    assert json.loads((tmp_path / "l.json").read_text())["cells"] == result["cells"]
    # another column set is another eval command: the evals run again, the trainings do not
    assert llamacpp_study.main([*_args(tmp_path), "--columns", "Q4_0", "Q4_0+imatrix", "--keep-gguf"]) == 0
    assert [c[1] for c in fake.commands] == ["eval.py"] * 3
    assert len(list((tmp_path / "study").rglob("m-F32.gguf"))) == 3


def test_an_earlier_result_merges_into_a_fresh_study_folder(tmp_path, monkeypatch, capsys):
    """A fresh machine has no study folder: --merge keeps the committed result's cells (measured the same way only)."""
    import shutil

    fake = FakeCells()
    monkeypatch.setattr(study, "run_cell", fake)
    assert llamacpp_study.main(_args(tmp_path)) == 0
    earlier = json.loads((tmp_path / "l.json").read_text())
    shutil.copy(tmp_path / "l.json", tmp_path / "earlier.json")
    shutil.rmtree(tmp_path / "study")
    fake.commands.clear()
    merge = ["--merge", str(tmp_path / "earlier.json")]
    assert llamacpp_study.main([*_args(tmp_path), "--finished-only", *merge]) == 0
    assert fake.commands == []
    result = json.loads((tmp_path / "l.json").read_text())
    assert result["cells"] == earlier["cells"] and result["aggregate"] == earlier["aggregate"]
    assert result["settings"]["merged"] == [{"json": str(tmp_path / "earlier.json"), "command": earlier["command"]}]
    assert f"- `{tmp_path / 'earlier.json'}`: `python bench/llamacpp_study.py" in (tmp_path / "l.md").read_text()
    # new seeds of one row join the earlier rows; a cell measured here wins over the earlier copy
    monkeypatch.setitem(FAKE_PPL, "default", (10.0, 12.5, 11.5, 10.1))
    assert llamacpp_study.main([*_args(tmp_path), "--rows", "default", "--seeds", "0", "1", *merge]) == 0
    assert [c[1] for c in fake.commands] == ["train.py", "eval.py"] * 2
    result = json.loads((tmp_path / "l.json").read_text())
    assert set(result["cells"]) == {"default", "pretrained", "control"} and result["settings"]["rows"] == ["default", "pretrained", "control"] and result["settings"]["seeds"] == [0, 1]
    assert result["cells"]["default"]["0"]["wiki"]["Q4_0"] == 12.5 and result["cells"]["control"] == earlier["cells"]["control"]
    # results measured another way do not share a table: one line, exit 2
    assert llamacpp_study.main([*_args(tmp_path), "--max-eval-windows", "4", "--finished-only", *merge]) == 2
    assert "measured another way: max_eval_windows 8 (here 4)" in capsys.readouterr().err


def test_runs_of_a_training_queue_are_used_waited_for_or_refused(tmp_path, monkeypatch, capsys):
    fake = FakeCells()
    monkeypatch.setattr(study, "run_cell", fake)
    runs = tmp_path / "queue"
    args = _args(tmp_path, "--runs", str(runs))
    common = ["model=tiny-llama", "data.eval_seq_len=128"]
    # control_s0 finished by the queue with the validation-only overrides; default_s0 still training (no metrics.json)
    _write_run(runs / "control_s0", study.expected_train_signature(
        [*llamacpp_rows.train_overrides("control", 0, 2, common, []), "quant=none", "curvature=null"]))
    (runs / "default_s0").mkdir()
    assert llamacpp_study.main(args) == 0
    assert [c[1] for c in fake.commands] == ["eval.py", "eval.py"]  # nothing trained: control used, default awaited
    assert _value(fake.commands[1], "adapter") == str(runs / "control_s0" / "adapter")
    assert f"waiting for {runs / 'default_s0'}" in capsys.readouterr().out
    result = json.loads((tmp_path / "l.json").read_text())
    assert set(result["cells"]) == {"pretrained", "control"} and "default" not in result["aggregate"]["derived"]["wiki"]

    # a row the queue does not have is trained in the study folder, unless --no-train
    fake.commands.clear()
    assert llamacpp_study.main([*_args(tmp_path, "--runs", str(tmp_path / "empty")), "--no-train"]) == 0
    assert [c[1] for c in fake.commands] == []  # pretrained done; control and default: no run, none trained
    assert llamacpp_study.main(_args(tmp_path, "--runs", str(tmp_path / "empty"))) == 0
    assert [c[1] for c in fake.commands] == ["train.py", "eval.py", "train.py", "eval.py"]

    # a finished run of another config cannot stand in for the default recipe: one line, exit 2
    _write_run(runs / "default_s0", study.expected_train_signature(llamacpp_rows.train_overrides("control", 0, 2, common, [])))
    assert llamacpp_study.main(args) == 2
    err = capsys.readouterr().err
    assert f"error: --reuse default:0={runs / 'default_s0'} (from --runs) cannot be used" in err and "noise.distribution._target_" in err


class InterruptedTraining(FakeCells):
    """train.py is interrupted after its first checkpoint: it leaves checkpoints/last.ckpt and no finished run."""

    def __call__(self, command, log, lock):
        if command[1] != "train.py":
            return super().__call__(command, log, lock)
        self.commands.append(command)
        checkpoints = Path(_value(command, "hydra.run.dir")) / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        (checkpoints / "last.ckpt").write_bytes(b"step 50")
        raise RuntimeError("exit code -9: train.py")


def test_an_interrupted_training_resumes_from_its_last_checkpoint(tmp_path, monkeypatch, capsys):
    """A study stopped mid-training (the machine went away) goes on from the run's last checkpoint when it runs again
    with the same command; another command in that folder trains afresh and never resumes the leftover checkpoint."""
    args = [*_args(tmp_path), "--rows", "control"]
    run_dir = tmp_path / "study" / "control" / "seed0" / "train"
    monkeypatch.setattr(study, "run_cell", InterruptedTraining())
    assert llamacpp_study.main(args) == 1
    assert "cells: 0 run, 0 reused" in capsys.readouterr().out
    fake = FakeCells()
    monkeypatch.setattr(study, "run_cell", fake)
    assert llamacpp_study.main(["--dry-run", *args]) == 0
    assert f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" in capsys.readouterr().out and fake.commands == []
    assert llamacpp_study.main(args) == 0
    train, evaluate = fake.commands
    assert train[-1] == f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}" and evaluate[1] == "eval.py"
    assert f"resuming the interrupted training in {run_dir}" in capsys.readouterr().out

    # another command (here another number of steps) in the same folder: a fresh start, the leftover checkpoint removed
    monkeypatch.setattr(study, "run_cell", InterruptedTraining())
    assert llamacpp_study.main([*args, "--steps", "3"]) == 1
    monkeypatch.setattr(study, "run_cell", fake)
    fake.commands.clear()
    assert llamacpp_study.main([*args, "--steps", "4"]) == 0
    assert not any(c.startswith("ckpt_path=") for c in fake.commands[0]) and "trainer.max_steps=4" in fake.commands[0]
    assert f"training {run_dir} afresh" in capsys.readouterr().out and not (run_dir / "checkpoints" / "last.ckpt").exists()


def test_bad_rows_and_columns_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(llamacpp_rows, "ROOT", tmp_path)  # a checkout without the recipe configs
    assert llamacpp_study.main(_args(tmp_path)) == 2
    assert "row control trains experiment=npft_smollm2, but conf/experiment/npft_smollm2.yaml is not in this checkout" in capsys.readouterr().err
    monkeypatch.setattr(llamacpp_rows, "ROOT", ROOT)
    assert llamacpp_study.main([*_args(tmp_path), "--columns", "Q4_0", "Q9_9+imatrix"]) == 2
    assert "--columns: 'Q9_9' is not a llama.cpp file type" in capsys.readouterr().err


def _drawn_figures(monkeypatch) -> list[dict]:
    """What each saved figure's first panel shows: title, bar heights, horizontal lines, y range and texts."""
    from npft_lightning.tasks import figures as project_io

    drawn, save = [], project_io.save_figure

    def spy(fig, path, dpi=120):
        ax = fig.axes[0]
        drawn.append({"title": fig._suptitle.get_text(), "heights": [p.get_height() for p in ax.patches],
                      "lines": [ln.get_ydata()[0] for ln in ax.lines if len(set(ln.get_ydata())) == 1],
                      "ylim": ax.get_ylim(), "texts": [t.get_text() for t in ax.texts]})
        return save(fig, path, dpi)

    monkeypatch.setattr(project_io, "save_figure", spy)
    return drawn


def test_figure_draws_the_gap_closed_of_each_recipe_and_file(tmp_path, monkeypatch):
    cells = {"control": {"0": {"wiki": {"F32": 10.0, "Q4_0": 14.0, "Q4_0+imatrix": 12.0, "Q8_0": 10.2}}},
             "default": {"0": {"wiki": {"F32": 10.1, "Q4_0": 12.0, "Q4_0+imatrix": 11.5, "Q8_0": 10.2}}},
             "mixed_q4_0": {"0": {"wiki": {"F32": 10.2, "Q4_0": 11.0, "Q4_0+imatrix": 10.5, "Q8_0": 10.3}}}}
    result = {"settings": {"columns": COLUMNS, "seeds": [0]}, "aggregate": llamacpp_rows.aggregate(cells, COLUMNS)}
    drawn = _drawn_figures(monkeypatch)
    assert llamacpp_render.plot_gap_closed(result, tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    assert fig["heights"] == pytest.approx([0.5, 0.25, 0.0, 0.75, 0.75, -0.5])  # per row, each column's (q_ctrl - q_row) / gap
    assert 0 in fig["lines"] and 1 in fig["lines"] and fig["ylim"][0] <= -0.5 and fig["ylim"][1] >= 1
    assert "SINGLE SEED (seed 0)" in fig["title"]
    assert llamacpp_render.plot_gap_closed({**result, "aggregate": llamacpp_rows.aggregate({"control": cells["control"]}, COLUMNS)},
                                           tmp_path / "none.png") is None


def test_figure_cuts_a_bar_of_a_near_zero_gap_and_writes_its_value(tmp_path, monkeypatch):
    """The control's Q8_0 gap is noise-sized: a recipe 0.06 PPL worse there is -5 gaps, which would flatten the other
    bars; the axis stops at the limit and the cut bar carries its value."""
    cells = {"control": {"0": {"wiki": {"F32": 10.0, "Q4_0": 14.0, "Q4_0+imatrix": 12.0, "Q8_0": 10.01}}},
             "mixed_q4_0": {"0": {"wiki": {"F32": 10.2, "Q4_0": 12.0, "Q4_0+imatrix": 11.0, "Q8_0": 10.06}}}}
    result = {"settings": {"columns": COLUMNS, "seeds": [0]}, "aggregate": llamacpp_rows.aggregate(cells, COLUMNS)}
    drawn = _drawn_figures(monkeypatch)
    llamacpp_render.plot_gap_closed(result, tmp_path / "g.png")
    (fig,) = drawn
    assert fig["ylim"][0] == pytest.approx(-llamacpp_render.GAP_AXIS_LIMIT) and fig["ylim"][1] >= 1
    assert fig["texts"] == ["-5.0"]  # only the cut bar is labelled, with its value


@pytest.mark.slow
@pytest.mark.skipif(not __import__("npft_lightning.quant.llamacpp", fromlist=["x"]).llama_cpp_installed(),
                    reason="the llamacpp extra is not installed (make llamacpp)")
def test_llamacpp_study_end_to_end_on_tiny_llama(tmp_path):
    """Train control + default, make and score the llama.cpp files of them and the pretrained model on two corpora; a
    rerun runs nothing."""
    ood = tmp_path / "ood.txt"
    ood.write_text("def f(x):\n    return x + 1\n\nThe quick brown fox jumps over the lazy dog.\n\n" * 40)
    args = ["--model", "tiny-llama", "--rows", "pretrained", "control", "default", "--seeds", "0", "--columns", *COLUMNS,
            "--steps", "2", "--max-eval-windows", "1", "--calib-windows", "2", "--eval-seq-len", "128", "--ood-text", str(ood),
            "--set", "data.seq_len=64", "--eval-set", "calibration.length=64", "--eval-set", "llamacpp_threads=1",
            "--study-dir", str(tmp_path / "study"), "--out-json", str(tmp_path / "l.json"), "--results-md", str(tmp_path / "l.md"),
            "--plot", str(tmp_path / "l.png")]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "bench/llamacpp_study.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "cells: 5 run, 0 reused" in first.stdout
    result = json.loads((tmp_path / "l.json").read_text())
    for row in ("pretrained", "control", "default"):
        for corpus in ("wiki", "pydoc"):
            cell = result["cells"][row]["0" if row != "pretrained" else "-"][corpus]
            assert {"F32", "Q4_0", "Q4_0+imatrix", "Q8_0"} <= set(cell)
            assert cell["F32"] == pytest.approx(cell["fp_pytorch"], rel=1e-3)  # llama.cpp's F32 is the model
    assert result["cells"]["control"]["0"]["wiki"]["F32"] != result["cells"]["control"]["0"]["pydoc"]["F32"]
    assert "gap_closed" in result["aggregate"]["derived"]["pydoc"]["default"]
    assert not list((tmp_path / "study").rglob("*.gguf"))
    text = (tmp_path / "l.md").read_text()
    assert "Python 3.11 manual" in text and "Q4_0 vs control Q4_0+imatrix" in text
    second = subprocess.run([sys.executable, "bench/llamacpp_study.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert second.returncode == 0 and "cells: 0 run, 5 reused" in second.stdout


def test_gptq_llamacpp_reuses_the_study_cells_windows_and_pairs_with_the_control(tmp_path):
    """bench/gptq_llamacpp.py: the study cell's command with its llama.cpp files swapped for the GPTQ quantizer, and
    the gap closed against the control's plain file of the same type, per corpus."""
    cell = tmp_path / "control" / "seed0" / "eval"
    cell.mkdir(parents=True)
    (cell / "command.json").write_text(json.dumps(["py", "eval.py", "model=smollm2-135m", "quant=none", "llamacpp_types=[Q4_0]",
                                                   "imatrix=both", "data.max_eval_windows=8", "gguf_out=/x/m.gguf", "adapter=/r/adapter",
                                                   "hydra.run.dir=/x"]))
    command = gptq_llamacpp.cell_command(cell, "gptq_q4_0", tmp_path / "out")
    assert command[2:] == ["model=smollm2-135m", "data.max_eval_windows=8", "adapter=/r/adapter", "quant=[gptq_q4_0]",
                           "llamacpp_ppl=true", f"gguf_out={tmp_path / 'out' / 'm.gguf'}", f"hydra.run.dir={tmp_path / 'out'}"]

    def llama(fp, plain, imatrix):
        split = lambda v: {"splits": {"validation": {"ppl": v}, "test": {"ppl": v + 1}}, "bytes": 100}  # noqa: E731
        return {"llamacpp": {"F32": split(fp), "Q4_0": split(plain), "Q4_0+imatrix": split(imatrix)}}

    control = llama(10.0, 14.0, 12.0)
    gptq = {"gguf": {"gptq_q4_0": {"bytes": 99, "ppl": 11.0, "ppl_ratio": 1.001}}, "ppl": {"test": {"gptq_q4_0": 12.5}}}
    row = gptq_llamacpp.row_of("control", 0, "gptq_q4_0", gptq, control, control)
    wiki, python = row["corpora"]["validation"], row["corpora"]["test"]
    assert wiki["gap_closed"] == pytest.approx({"Q4_0": 0.0, "Q4_0+imatrix": 0.5, "gptq_q4_0": 0.75})
    assert python["ppl"]["gptq_q4_0"] == 12.5 and python["gap_closed"]["gptq_q4_0"] == pytest.approx((15 - 12.5) / 4)
    assert "| control | 0 | Q4_0 | 10.000 | 14.000 (+0.00) | 12.000 (+0.50) | 11.000 (+0.75) | 0.9900 |" in gptq_llamacpp.render([row], "cmd")
    assert "Over seeds" not in gptq_llamacpp.render([row], "cmd")  # one seed: no summary
    # a second seed where the GPTQ file loses: mean and sample sd of the gap closed, 1 of 2 better
    worse = {"gguf": {"gptq_q4_0": {"bytes": 99, "ppl": 12.2, "ppl_ratio": 1.0}}, "ppl": {"test": {"gptq_q4_0": 13.0}}}
    rows = [row, gptq_llamacpp.row_of("control", 1, "gptq_q4_0", worse, control, control)]
    (summary,) = gptq_llamacpp.seed_summary(rows, "validation")
    assert summary["seeds"] == [0, 1] and summary["gptq_better"] == 1
    assert summary["gptq"] == pytest.approx((0.6, 0.3 / 2**0.5)) and summary["imatrix"] == pytest.approx((0.5, 0.0))
    assert "| control | Q4_0 | 0, 1 | 0.50 ± 0.00 | 0.60 ± 0.21 | 1 of 2 |" in gptq_llamacpp.render(rows, "cmd")
    better = {"gguf": {"gptq_q4_0": {"bytes": 99, "ppl": 11.5, "ppl_ratio": 1.0}}, "ppl": {"test": {"gptq_q4_0": 13.0}}}
    (summary,) = gptq_llamacpp.seed_summary([row, gptq_llamacpp.row_of("control", 2, "gptq_q4_0", better, control, control)], "validation")
    assert summary["gptq_better"] == 2
    # a control whose file is no better unquantized (the gap is negative): no fraction to close, left out of the summary
    no_gap = llama(10.0, 9.5, 9.8)
    flat = gptq_llamacpp.row_of("control", 3, "gptq_q4_0", gptq, no_gap, no_gap)
    assert flat["corpora"]["validation"]["gap_closed"] == {"Q4_0": None, "Q4_0+imatrix": None, "gptq_q4_0": None}
    assert "| control | 3 | Q4_0 | 10.000 | 9.500 (—) | 9.800 (—) | 11.000 (—) |" in gptq_llamacpp.render([flat], "cmd")
    (summary,) = gptq_llamacpp.seed_summary(rows + [flat], "validation")
    assert summary["seeds"] == [0, 1]


def test_gptq_llamacpp_on_a_fresh_machine_pairs_with_the_study_json_and_carries_earlier_rows(tmp_path, capsys):
    """No study folders: the control's files come from the llama.cpp study's JSON, earlier rows from the bench's own."""
    study_json = {"eval_split_of_corpus": {"wiki": "validation", "pydoc": "test"},
                  "cells": {"control": {"0": {"wiki": {"F32": 10.0, "Q4_0": 14.0, "Q4_0+imatrix": 12.0, "fp_pytorch": 10.0},
                                              "pydoc": {"F32": 11.0, "Q4_0": 15.0, "Q4_0+imatrix": 13.0, "fp_pytorch": 11.0}}}},
                  "files": {"control": {"0": {"F32": {"bytes": 400}, "Q4_0": {"bytes": 100}, "Q4_0+imatrix": {"bytes": 101}}}}}
    control = gptq_llamacpp.cell_from_study_json(study_json, "control", 0)
    assert control["llamacpp"]["Q4_0+imatrix"] == {"bytes": 101, "splits": {"validation": {"ppl": 12.0}, "test": {"ppl": 13.0}}}
    assert gptq_llamacpp.cell_from_study_json(study_json, "control", 1) is None
    gptq = {"gguf": {"gptq_q4_0": {"bytes": 99, "ppl": 11.0, "ppl_ratio": 1.0}}, "ppl": {"test": {"gptq_q4_0": 12.0}}}
    row = gptq_llamacpp.row_of("mixed_q4_0", 0, "gptq_q4_0", gptq, control, control)
    assert row["corpora"]["validation"]["gap_closed"]["gptq_q4_0"] == pytest.approx(0.75)
    assert row["corpora"]["test"]["gap_closed"]["gptq_q4_0"] == pytest.approx(0.75)

    (tmp_path / "earlier.json").write_text(json.dumps({"rows": [row], "command": "python bench/gptq_llamacpp.py --earlier"}))
    (tmp_path / "study.json").write_text(json.dumps(study_json))
    args = ["--cells", "mixed_q4_0:gptq_q4_0", "control:gptq_q4_0", "--seeds", "0", "--llamacpp-study", str(tmp_path / "none"),
            "--study-dir", str(tmp_path / "gptq"), "--out-json", str(tmp_path / "g.json"), "--results-md", str(tmp_path / "g.md"),
            "--finished-only", "--merge", str(tmp_path / "earlier.json"), "--llamacpp-json", str(tmp_path / "study.json")]
    assert gptq_llamacpp.main(args) == 0
    assert "skipped control:gptq_q4_0 seed 0" in capsys.readouterr().out  # no cell of its own to run it from
    result = json.loads((tmp_path / "g.json").read_text())
    assert result["rows"] == [row] and result["merged"] == [{"json": str(tmp_path / "earlier.json"), "command": "python bench/gptq_llamacpp.py --earlier"}]
    assert f"- `python bench/gptq_llamacpp.py --earlier` (`{tmp_path / 'earlier.json'}`)" in (tmp_path / "g.md").read_text()


def test_gptq_llamacpp_pretrained_row_runs_once_against_its_own_files(tmp_path, capsys):
    def llama(fp, plain, imatrix):
        split = lambda v: {"splits": {"validation": {"ppl": v}, "test": {"ppl": v + 1}}, "bytes": 100}  # noqa: E731
        return {"complete": True, "llamacpp": {"F32": split(fp), "Q4_0": split(plain), "Q4_0+imatrix": split(imatrix)}}

    cell = tmp_path / "study" / "pretrained" / "eval"
    cell.mkdir(parents=True)
    (cell / "metrics.json").write_text(json.dumps(llama(13.0, 17.0, 15.0)))
    out = tmp_path / "gptq" / "pretrained_gptq_q4_0"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"complete": True, "gguf": {"gptq_q4_0": {"bytes": 100, "ppl": 14.0}},
                                                  "ppl": {"test": {"gptq_q4_0": 15.0}}}))
    args = ["--cells", "pretrained:gptq_q4_0", "--seeds", "0", "1", "--llamacpp-study", str(tmp_path / "study"), "--study-dir",
            str(tmp_path / "gptq"), "--out-json", str(tmp_path / "g.json"), "--results-md", str(tmp_path / "g.md"), "--finished-only"]
    assert gptq_llamacpp.main(args) == 0
    (row,) = json.loads((tmp_path / "g.json").read_text())["rows"]  # once, not per seed; no control needed
    assert row["seed"] is None and row["corpora"]["validation"]["gap_closed"]["gptq_q4_0"] == pytest.approx(0.75)
    assert "| pretrained | - | Q4_0 | 13.000 | 17.000 (+0.00) | 15.000 (+0.50) | 14.000 (+0.75) | 1.0000 |" in (tmp_path / "g.md").read_text()


def test_gguf_bench_adds_rows_only_to_a_result_of_the_same_model_windows_and_types():
    """An earlier result written before --model existed is SmolLM2's; a Gemma run may not join it."""
    from types import SimpleNamespace

    earlier = {"max_eval_windows": 4, "quantizers": ["q4_0", "q4_1", "q8_0"]}
    same = SimpleNamespace(add_to="old.json", model="smollm2-135m", max_eval_windows=4, quantizers=["q4_0", "q4_1", "q8_0"])
    gguf_llamacpp.check_same_settings(earlier, same)
    with pytest.raises(SystemExit, match=r"model=smollm2-135m, not gemma3-270m; pass --model smollm2-135m$"):
        gguf_llamacpp.check_same_settings(earlier, SimpleNamespace(**{**vars(same), "model": "gemma3-270m"}))
    with pytest.raises(SystemExit, match=r"pass --quantizers q4_0 q4_1 q8_0$"):
        gguf_llamacpp.check_same_settings(earlier, SimpleNamespace(**{**vars(same), "quantizers": ["q8_0"]}))
    bundled = {"ppl": 20.6, "ppl_second_half": 19.9, "bytes": 2**20, "tokens_per_s": 900.0, "path": "/c/gemma-3-270m-q4_k_m.gguf"}
    assert "| pretrained | original file gemma-3-270m-q4_k_m.gguf | 20.600 |" in gguf_llamacpp.table({"rows": {}, "bundled": bundled})


def test_update_kept_is_zero_where_the_file_snaps_back_and_one_where_it_follows():
    """bench/update_kept.py: a model born on a file type's grid loses a sub-step update to that file type
    (pretrained on the grid, nothing kept); a fine grid (Q8_0) keeps an update of a few of its steps about whole."""
    import torch
    import update_kept

    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.lm.models import build_tiny_model
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType

    model = build_tiny_model(arch="llama", hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=4,
                             max_position_embeddings=64, seed=0)
    linears = decoder_linears(model)
    q4_0 = LlamaCppFileType("Q4_0").bind(linears)
    with torch.no_grad():  # the pretrained model: a Q4_0 file dequantized
        for name, linear in linears.items():
            linear.weight.copy_(q4_0.quantize_weight(linear.weight.float(), name=name))
    base = {n: l.weight.detach().clone() for n, l in linears.items()}
    born = update_kept.update_kept(base, linears, q4_0)
    assert born["pretrained_on_grid"] == 1.0
    with torch.no_grad():  # a tiny update, far below half a step: the file puts every weight back
        for linear in linears.values():
            linear.weight.add_(1e-6 * torch.randn_like(linear.weight))
    snapped = update_kept.update_kept(base, linears, q4_0)
    assert snapped["update_kept"] == pytest.approx(0.0, abs=1e-6) and set(snapped["by_type"]) == {"q4_0"}
    with torch.no_grad():  # Q8_0 (256 levels) follows an update of a few of its steps
        for name, linear in linears.items():
            linear.weight.copy_(base[name] + 0.02 * base[name].abs().amax() * torch.randn_like(linear.weight))
    followed = update_kept.update_kept(base, linears, LlamaCppFileType("Q8_0").bind(linears))
    assert followed["update_kept"] == pytest.approx(1.0, abs=0.05)
