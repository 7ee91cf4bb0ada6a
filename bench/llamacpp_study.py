"""The study, judged by llama.cpp (issue 28): does a recipe's adapter make the files llama.cpp's own quantizer
writes better than the no-noise control's, with and without an importance matrix?

Rows (each trained once per seed with train.py, same data / steps / seed as the control; --rows picks them):

  pretrained           the model as loaded (no training)
  control              the default recipe without noise (experiment=npft_smollm2 noise=none)
  default              the default recipe (experiment=npft_smollm2: mixed objective, RTN-4 error)
  mixed_q4_0 ...       experiment=<row>: mixed_q4_0, mixed_q4_k, mixed_q4_0_imatrix, mixed_q4_k_imatrix,
                       qat_q4_0, qat_q4_0_imatrix, qat_q4_k, qat_q4_k_imatrix, qat_rtn4 (a row whose
                       config this checkout lacks is refused)
  qat75_q4_k_imatrix   experiment=qat_q4_k_imatrix noise.step_probability=0.75 (three quarters of the steps)

Columns: llama.cpp files made by eval.py's ``llamacpp_types`` (llama.cpp's quantizer on the merged model, the
imatrix computed on the calibration windows of the Wikipedia train split), each scored by llama.cpp's forward:
F32 (unquantized) and --columns (default Q4_0, Q4_0+imatrix, Q4_K_M, Q4_K_M+imatrix, IQ4_XS+imatrix, Q5_K_M,
Q8_0), each with its bits per weight. One eval.py process per model writes the F32 file, the imatrix and every
file once and scores each on both corpora: the Wikipedia test split (in domain) and the Python 3.11 manual (out of
domain). Derived (paired by seed with the control): gap closed at each file type, the recipe's file against the
control's file of the same type with an imatrix, what the imatrix adds to each row, the unquantized cost.

Every cell is a train.py / eval.py subprocess writing into --study-dir; a finished cell is never run again, so an
interrupted study resumes (an interrupted training from its last checkpoint); --merge joins an earlier result's
cells (its JSON), so a study goes on in another folder or on another machine. The GGUF files of a cell are deleted
once its metrics are in (--keep-gguf keeps them).

    python bench/llamacpp_study.py                                   # the full study (days on a CPU)
    python bench/llamacpp_study.py --rows pretrained control --seeds 0 --runs /work/study/llamacpp/train --no-train
    python bench/llamacpp_study.py --finished-only                   # the tables of the cells finished so far
    python bench/llamacpp_study.py --rows mixed_q4_k --seeds 1 --merge docs/bench/llamacpp_study.json   # add to the result

``--runs DIR`` uses the runs a training queue makes in DIR/<row>_s<seed> (their config is checked like --reuse's;
one still without metrics.json is waited for: its evals are left out this time); other runs are trained in the
study folder, unless --no-train.

The parts: study.py (plan, resume, lock, subprocess cells), study_corpora.py (the corpora), llamacpp_rows.py
(rows, columns, derived numbers), llamacpp_render.py (tables, figure).
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path
from typing import Any

from common import StudyError, machine, write_json
from llamacpp_render import BLOCK_BEGIN, BLOCK_END, plot_gap_closed, render_markdown
from llamacpp_rows import (
    COLUMNS,
    F32,
    ROWS,
    STUDY_ROWS,
    aggregate,
    check_rows,
    column_label,
    file_types,
    train_overrides,
)
from study import (
    add_study_arguments,
    merge_cells,
    merge_provenance,
    parse_reuse,
    print_outcome,
    read_study_json,
    run_plan,
    study_main,
    study_path,
    trained_row,
    write_results_block,
)
from study_corpora import DEFAULT_CORPORA, corpus_setup

SEEDS = [0, 1, 2]
WINDOWS = 8
# What a cell keeps of each file's report (besides its PPL): sizes, and llama.cpp's speed per corpus.
FILE_KEYS = ("bits_per_weight", "bits_per_weight_linears", "bytes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=STUDY_ROWS, choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    parser.add_argument("--columns", nargs="+", type=column_label, default=COLUMNS, metavar="TYPE[+imatrix]",
                        help="llama.cpp files besides F32: a file type (llamacpp_types), +imatrix for the one weighted by the imatrix")
    parser.add_argument("--max-eval-windows", type=int, default=WINDOWS, help="eval windows per corpus")
    add_study_arguments(parser)
    parser.add_argument("--reuse", action="append", default=[], metavar="ROW:SEED=RUN_DIR",
                        help="a finished train.py run to use for that cell (its config must match)")
    parser.add_argument("--runs", default=None, metavar="DIR",
                        help="a training queue's folder: DIR/<row>_s<seed> is that cell's run (config checked; waited for while unfinished)")
    parser.add_argument("--no-train", action="store_true", help="train nothing here: rows without a finished run are left out")
    parser.add_argument("--keep-gguf", action="store_true", help="keep each cell's GGUF files (about 1.7 GB per SmolLM2 cell)")
    parser.add_argument("--study-dir", default="logs/bench/llamacpp_study")
    parser.add_argument("--out-json", default="docs/bench/llamacpp_study.json")
    parser.add_argument("--results-md", default="docs/llamacpp_study.md")
    parser.add_argument("--plot", default="docs/bench/llamacpp_study.png", help="gap closed per file type and row")
    parser.add_argument("--finished-only", action="store_true",
                        help="run nothing: write the tables and plot of the cells finished so far (a partial study)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="an earlier result of this study (its --out-json, e.g. docs/bench/llamacpp_study.json) measured the same "
                             "way: its cells join this run's tables (a cell finished here wins), so a study goes on in another folder or session")
    return parser


def main(argv: list[str] | None = None) -> int:
    return study_main(build_parser(), study, argv)


def eval_arguments(args: argparse.Namespace, common: list[str], splits: list[str], corpus_overrides: list[str]) -> list[str]:
    """eval.py's arguments shared by every model (its adapter and gguf_out are the cell's)."""
    types, imatrix = file_types(args.columns)
    out = [*common, "quant=none", f"llamacpp_types=[{','.join(types)}]", f"imatrix={str(imatrix).lower()}",
           f"splits=[{','.join(splits)}]", f"data.max_eval_windows={args.max_eval_windows}", "print_config=false",
           *corpus_overrides, *args.eval_overrides]
    return out + ([f"calibration.windows={args.calib_windows}"] if args.calib_windows is not None else [])


def plan_cells(args: argparse.Namespace, study_dir: Path, eval_common: list[str], common: list[str]) -> list[dict[str, Any]]:
    """The pretrained eval first, then seed by seed (so a partial study has whole seeds) each row's training and eval."""
    reuse = parse_reuse(args.reuse, [r for r in ROWS if ROWS[r] is not None])
    discard = [] if args.keep_gguf else ["*.gguf"]
    plan: list[dict[str, Any]] = []
    if "pretrained" in args.rows:
        cell = study_dir / "pretrained" / "eval"
        plan.append({"row": "pretrained", "seed": None, "kind": "eval", "dir": cell, "discard": discard,
                     "command": [sys.executable, "eval.py", *eval_common, f"gguf_out={cell / 'm.gguf'}"]})
    for seed in args.seeds:
        for row in (r for r in args.rows if ROWS[r] is not None):
            queued = Path(args.runs).expanduser().resolve() / f"{row}_s{seed}" if args.runs else None
            if (row, seed) in reuse:
                run_dir, given = reuse[row, seed], f"{row}:{seed}={reuse[row, seed]}"
            elif queued is not None and queued.is_dir():
                run_dir, given = queued, f"{row}:{seed}={queued} (from --runs)"
            else:
                run_dir, given = study_dir / row / f"seed{seed}" / "train", None
            cell = study_dir / row / f"seed{seed}" / "eval"
            train, evaluate = trained_row(row, seed, train_overrides(row, seed, args.steps, common, args.train_overrides), run_dir,
                                          given, cell, [*eval_common, f"gguf_out={cell / 'm.gguf'}"])
            train["trained_elsewhere"] = args.no_train or run_dir == queued
            evaluate["discard"] = discard
            plan += [train, evaluate]
    return plan


def cell_of(metrics: dict[str, Any], split_of_corpus: dict[str, str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An eval's metrics.json -> (corpus -> file label -> llama.cpp PPL, with PyTorch's unquantized PPL as
    ``fp_pytorch``; file label -> sizes and llama.cpp's tokens/s per corpus)."""
    reports = {label: r for label, r in metrics["llamacpp"].items() if label != "imatrix"}
    ppl = {corpus: {**{label: r["splits"][split]["ppl"] for label, r in reports.items()}, "fp_pytorch": metrics["ppl"][split]["fp"]}
           for corpus, split in split_of_corpus.items()}
    files = {label: {**{k: r[k] for k in FILE_KEYS},
                     "tokens_per_s": {corpus: r["splits"][split]["tokens_per_s"] for corpus, split in split_of_corpus.items()}}
             for label, r in reports.items()}
    return ppl, files


def file_sizes(files: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float]]:
    """Per file label, the mean over every cell of its bits per weight (file, decoder linears) and tokens/s."""
    labels = list(dict.fromkeys(label for seeds in files.values() for per in seeds.values() for label in per))
    reports = {label: [per[label] for seeds in files.values() for per in seeds.values() if label in per] for label in labels}
    return {label: {"bits_per_weight": statistics.fmean(r["bits_per_weight"] for r in rs),
                    "bits_per_weight_linears": statistics.fmean(r["bits_per_weight_linears"] for r in rs),
                    "tokens_per_s": statistics.median(v for r in rs for v in r["tokens_per_s"].values()),
                    "cells": len(rs)} for label, rs in reports.items()}


# Settings under which two results' cells are the same measurement (eval overrides such as llama.cpp's threads are not).
MERGE_SETTINGS = ("model", "columns", "max_eval_windows", "calib_windows", "eval_seq_len", "steps", "overrides", "train_overrides")


def load_earlier(path: Path, settings: dict[str, Any], split_of_corpus: dict[str, str]) -> dict[str, Any]:
    """An earlier result of this study (its --out-json), checked to be measured like this one."""
    other = read_study_json(path, "llamacpp_study")
    theirs = other.get("settings", {})
    differ = [f"{key} {theirs.get(key)!r} (here {settings[key]!r})" for key in MERGE_SETTINGS if theirs.get(key) != settings[key]]
    if other.get("eval_split_of_corpus") != split_of_corpus:
        differ.append(f"corpora {other.get('eval_split_of_corpus')!r} (here {split_of_corpus!r})")
    if differ:
        raise StudyError(f"--merge {path}: measured another way: {'; '.join(differ)}; only results measured the same way share a table")
    return other


def study(args: argparse.Namespace, argv: list[str]) -> int:
    from npft_lightning.core.env import default_cache_dir
    from npft_lightning.core.errors import UserError
    from npft_lightning.quant.llamacpp_quantize import file_type

    check_rows(args.rows)
    try:  # an unknown type stops here, not in every cell
        for name in file_types(args.columns)[0]:
            file_type(name, "--columns")
    except UserError as err:
        raise StudyError(str(err)) from None
    study_dir = study_path(args.study_dir).resolve()
    common = [f"model={args.model}", f"data.eval_seq_len={args.eval_seq_len}", *args.overrides]
    corpora, split_of_corpus, splits, corpus_overrides = corpus_setup(args, default_cache_dir(), common)
    plan = plan_cells(args, study_dir, eval_arguments(args, common, splits, corpus_overrides), common)

    cells: dict[str, dict[str, Any]] = {}
    files: dict[str, dict[str, Any]] = {}
    evals, ran, skipped, failures = run_plan(plan, args.lock, args.dry_run, "llama.cpp study", args.finished_only)
    for step, metrics in evals:
        seed_key = "-" if step["seed"] is None else str(step["seed"])
        ppl, sizes = cell_of(metrics, split_of_corpus)
        cells.setdefault(step["row"], {})[seed_key] = ppl
        files.setdefault(step["row"], {})[seed_key] = sizes
        for corpus, split in split_of_corpus.items():
            corpora[corpus]["tokens"] = metrics["llamacpp"][F32]["splits"][split]["tokens"]
    if args.dry_run:
        return 0
    print_outcome(ran, skipped, failures)
    reduced = (args.rows != STUDY_ROWS or args.seeds != SEEDS or args.columns != COLUMNS or args.max_eval_windows < WINDOWS
               or args.calib_windows is not None or args.steps is not None or args.corpora != DEFAULT_CORPORA)
    settings = {"model": args.model, "rows": args.rows, "seeds": args.seeds, "columns": args.columns, "steps": args.steps,
                "max_eval_windows": args.max_eval_windows, "calib_windows": args.calib_windows, "eval_seq_len": args.eval_seq_len,
                "overrides": args.overrides, "train_overrides": args.train_overrides, "eval_overrides": args.eval_overrides,
                "runs": args.runs, "reused_runs": args.reuse, "reduced": reduced}
    rows = list(args.rows)
    command = "python bench/llamacpp_study.py " + shlex.join(argv)
    if args.merge:
        others = [load_earlier(study_path(p), settings, split_of_corpus) for p in args.merge]
        for other in others:
            # corpora in this study's order (a JSON has its keys sorted), so the tables keep theirs
            theirs = {row: {seed: {c: per[c] for c in split_of_corpus if c in per} for seed, per in seeds.items()}
                      for row, seeds in other["cells"].items()}
            cells, files = merge_cells(cells, theirs), merge_cells(files, other.get("files", {}))
            for corpus, info in corpora.items():
                info.setdefault("tokens", other.get("corpora", {}).get(corpus, {}).get("tokens"))
        rows += [r for other in others for r in other["settings"].get("rows", []) if r not in rows and r in cells]
        settings["merged"] = merge_provenance(args.merge, others, command)
        # the settings describe the merged tables: every row and seed in them
        settings["rows"] = rows
        settings["seeds"] = sorted({int(seed) for seeds in cells.values() for seed in seeds if seed != "-"} | set(args.seeds))
    result = {
        "bench": "llamacpp_study", "date": date.today().isoformat(), "machine": machine(),
        "command": command,
        "settings": settings, "corpora": corpora, "eval_split_of_corpus": split_of_corpus,
        "cells": {row: cells[row] for row in rows if row in cells},
        "files": files, "file_sizes": file_sizes(files),
        "aggregate": aggregate({row: cells[row] for row in rows if row in cells}, args.columns),
        "failures": failures,
    }
    write_json(study_path(args.out_json), result)
    if plot_gap_closed(result, study_path(args.plot)):
        print(f"wrote {study_path(args.plot)}")
    write_results_block(study_path(args.results_md), render_markdown(result), BLOCK_BEGIN, BLOCK_END)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
