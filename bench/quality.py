"""The quality study: does NPFT make a model quantize better than the no-noise LoRA control?

Rows (each training row once per seed, same data / steps / seed as the control):

  pretrained       the model as loaded (no training)
  control          LoRA without noise (noise=none)
  npft_fisher      NPFT as first built, the study's base (experiment=npft_fisher: Fisher outliers, step noise)
  npft_pqi         NPFT with PQI outlier targeting (outliers=pqi, 4 intervals)
  npft_paper_0.1   NPFT with the reference code's noise at scale 0.1 (noise=npft_paper noise.scale=0.1)
  npft_per_epoch   NPFT with one noise draw per epoch (noise.schedule=per_epoch)
  paper_recipe     the NPFT paper's recipe as its code runs it (experiment=npft_paper: its learning rate, length,
                   outlier ratio and per-epoch noise; --steps and --train-set do not apply), paired by seed with
  paper_recipe_control   the same recipe without noise (experiment=npft_paper noise=none)

Columns: unquantized and fake-quantized PPL (eval.py) on two corpora: the Wikipedia test split
(in domain) and the Python 3.11 manual (out of domain; Debian's python3.11-doc, downloaded once
into the cache). Quantizers that need calibration (GPTQ) or a Fisher (k-means) calibrate on the
Wikipedia train split for both corpora.

Every cell is a train.py / eval.py subprocess writing into --study-dir; a cell whose JSON exists
for the same command (eval) or the same training config (train) is skipped, so an interrupted
study resumes. The aggregate (mean ± std over seeds) goes to --out-json and into the generated
block of --results-md.

    python bench/quality.py                                        # the full study (days on a CPU)
    python bench/quality.py --rows pretrained control npft_fisher --seeds 0 --quantizers rtn4 gptq4 \\
        --max-eval-windows 4 --calib-windows 32                    # a reduced study
    python bench/quality.py --reuse control:0=/runs/control --reuse npft_fisher:0=/runs/npft   # reuse trained runs
    python bench/quality.py --rows control qerr_all --steps 256 --merge docs/bench/screen_lr.json   # add a length to a study

``--merge`` joins an earlier study's cells (its --out-json) to this one's tables and plots when both were
measured the same way (model, windows, corpora, overrides): studies run in separate folders or sessions. With
``--finished-only`` and an empty --study-dir it redraws the tables and figures of a JSON alone.

This file is the driver; the parts: study.py (plan, resume, lock, subprocess cells, merge; bench/requant.py
runs on it too), study_corpora.py (the corpora), quality_rows.py (rows and aggregation), render.py (tables, figures).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import date
from pathlib import Path
from typing import Any

from common import machine, write_json
from quality_rows import (
    QUANTIZERS,
    RECIPE_ROWS,
    ROWS,
    aggregate,
    base_row,
    keyed_by_steps,
    steps_of,
    train_overrides,
    train_timing,
)
from render import (
    BLOCK_BEGIN,
    BLOCK_END,
    plot_frontier,
    plot_gap_vs_steps,
    plot_quality,
    render_markdown,
)
from study import (
    add_study_arguments,
    load_merged_study,
    merge_provenance,
    merge_studies,
    parse_reuse,
    print_outcome,
    run_plan,
    study_main,
    study_path,
    trained_row,
    write_results_block,
)
from study_corpora import DEFAULT_CORPORA, corpus_setup


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--quantizers", nargs="+", default=QUANTIZERS, help="conf/quant options")
    parser.add_argument("--max-eval-windows", type=int, default=None, help="eval windows per corpus (default: all)")
    add_study_arguments(parser, several_steps=True)
    parser.add_argument("--reuse", action="append", default=[], metavar="ROW:SEED=RUN_DIR",
                        help="a finished train.py run to use for that cell (its config must match)")
    parser.add_argument("--study-dir", default="logs/bench/quality")
    parser.add_argument("--out-json", default="docs/bench/quality.json")
    parser.add_argument("--results-md", default="docs/results.md")
    parser.add_argument("--plot", default="docs/bench/quality.png", help="the PPL-vs-control bar chart")
    parser.add_argument("--steps-plot", default=None, help="gap closed vs training steps (default: beside --plot, *_steps.png)")
    parser.add_argument("--frontier-plot", default=None, help="gap closed vs unquantized cost (default: beside --plot, *_frontier.png)")
    parser.add_argument("--finished-only", action="store_true",
                        help="run nothing: write the tables and plots of the cells finished so far (a partial study)")
    parser.add_argument("--merge", action="append", default=[], metavar="JSON",
                        help="an earlier study's --out-json whose cells join this one's tables and plots (same model, windows, "
                             "corpora and overrides; a one-length study's rows become ROW@STEPS); repeatable")
    parser.add_argument("--default-row", default=None, help="the row (ROW or ROW@STEPS) that experiment=npft_smollm2 (the default recipe) runs")
    parser.add_argument("--deploy-row", default=None, help="the row that the deployment recipe runs")
    return parser


def main(argv: list[str] | None = None) -> int:
    return study_main(build_parser(), study, argv)


def plan_cells(args: argparse.Namespace, study_dir: Path, eval_common: list[str], common: list[str],
               reuse: dict[tuple[str, int], Path]) -> list[dict[str, Any]]:
    """The pretrained evals first, then seed by seed (so a partial study has whole seeds) each length's trained rows."""
    plan: list[dict[str, Any]] = []
    if "pretrained" in args.rows:
        plan.append({"row": "pretrained", "seed": None, "kind": "eval", "dir": study_dir / "pretrained" / "eval",
                     "command": [sys.executable, "eval.py", *eval_common]})
    lengths: list[int | None] = list(args.steps) if args.steps else [None]
    for seed in args.seeds:
        for steps in lengths:
            for row in (r for r in args.rows if ROWS[r] is not None and (r not in RECIPE_ROWS or steps == lengths[0])):
                key = row if len(lengths) == 1 or row in RECIPE_ROWS else f"{row}@{steps}"  # a recipe row: once, own length
                run_dir = reuse.get((row, seed), study_dir / key / f"seed{seed}" / "train")
                plan += trained_row(key, seed, train_overrides(row, seed, steps, common, args.train_overrides), run_dir,
                                    f"{row}:{seed}={run_dir}" if (row, seed) in reuse else None,
                                    study_dir / key / f"seed{seed}" / "eval", eval_common)
    return plan


def study(args: argparse.Namespace, argv: list[str]) -> int:
    from npft_lightning.core.env import default_cache_dir

    study_dir = study_path(args.study_dir).resolve()
    reuse = parse_reuse(args.reuse, [r for r in ROWS if ROWS[r] is not None])
    common = [f"model={args.model}", f"data.eval_seq_len={args.eval_seq_len}", *args.overrides]
    corpora, split_of_corpus, splits, corpus_overrides = corpus_setup(args, default_cache_dir(), common)

    eval_common = [*common, f"quant=[{','.join(args.quantizers)}]", f"splits=[{','.join(splits)}]", *args.eval_overrides,
                   *corpus_overrides]
    if args.max_eval_windows is not None:
        eval_common.append(f"data.max_eval_windows={args.max_eval_windows}")
    if args.calib_windows is not None:
        eval_common.append(f"calibration.windows={args.calib_windows}")
    plan = plan_cells(args, study_dir, eval_common, common, reuse)

    cells: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    evals, ran, skipped, failures = run_plan(plan, args.lock, args.dry_run, "quality study", args.finished_only)
    for step, metrics in evals:
        seed_key = "-" if step["seed"] is None else str(step["seed"])
        for corpus, split in split_of_corpus.items():
            ppl = metrics["ppl"][split]
            corpora[corpus]["tokens"] = ppl.get("_tokens")
            cells.setdefault(step["row"], {}).setdefault(seed_key, {})[corpus] = {q: v for q, v in ppl.items() if not q.startswith("_")}

    timing = train_timing(plan)
    if args.dry_run:
        return 0
    settings = {"model": args.model, "rows": args.rows, "seeds": args.seeds, "quantizers": args.quantizers,
                "steps": args.steps, "max_eval_windows": args.max_eval_windows, "calib_windows": args.calib_windows,
                "eval_seq_len": args.eval_seq_len, "overrides": args.overrides, "train_overrides": args.train_overrides,
                "eval_overrides": args.eval_overrides,
                "reused_runs": {f"{r}:{s}": str(p) for (r, s), p in reuse.items()},
                "default_row": args.default_row, "deploy_row": args.deploy_row}
    rows = list(args.rows)
    command = "python bench/quality.py " + shlex.join(argv)
    if args.merge:
        others = [load_merged_study(study_path(p), settings, list(corpora)) for p in args.merge]
        cells, timing = merge_studies(keyed_by_steps(cells, args.steps), keyed_by_steps(timing, args.steps), others)
        rows += [r for other in others for r in other["settings"].get("rows", []) if r not in rows]
        # provenance: every command whose cells are in the tables, through merges of merges (a study seed by seed)
        settings["merged"] = merge_provenance(args.merge, others, command)
        # the settings describe the merged tables: every row, seed and length in them
        settings["rows"] = rows
        settings["seeds"] = sorted({int(seed) for seeds in cells.values() for seed in seeds if seed != "-"} | set(args.seeds))
        settings["steps"] = sorted({n for k in cells if (n := steps_of(k))} | set(args.steps or [])) or None
    print_outcome(ran, skipped, failures)
    reduced = (args.rows != list(ROWS) or args.seeds != [0, 1, 2] or args.quantizers != QUANTIZERS or args.max_eval_windows is not None
               or args.calib_windows is not None or args.steps is not None or args.corpora != DEFAULT_CORPORA)
    result = {
        "bench": "quality", "date": date.today().isoformat(), "machine": machine(),
        "command": command,
        "settings": {**settings, "reduced": reduced},
        "corpora": corpora, "eval_split_of_corpus": split_of_corpus,
        "cells": cells,
        "aggregate": aggregate({k: cells[k] for k in sorted(cells, key=lambda k: (steps_of(k) or 0, rows.index(base_row(k))))
                                if base_row(k) in rows}, args.quantizers),
        "timing": timing,
        "failures": failures,
    }
    write_json(study_path(args.out_json), result)
    plot = study_path(args.plot)
    for draw, target in ((plot_quality, plot), (plot_gap_vs_steps, study_path(args.steps_plot or plot.with_name(plot.stem + "_steps.png"))),
                         (plot_frontier, study_path(args.frontier_plot or plot.with_name(plot.stem + "_frontier.png")))):
        if draw(result, target):
            print(f"wrote {target}")
    write_results_block(study_path(args.results_md), render_markdown(result), BLOCK_BEGIN, BLOCK_END)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
