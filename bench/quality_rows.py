"""The rows of the quality study and their aggregation: each row's train.py overrides and label, the keys of
cells over several training lengths (``row@steps``), and the per-row mean ± std over seeds with the comparisons
against the no-noise control, paired by seed (pure functions of the per-cell PPLs)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

# One target grid per perturbed step, drawn from RTN-4 per channel, ggml q4_0 and NF4 (equal weights).
THREE_GRIDS = ["quant=[rtn4,q4_0,nf4]", "noise.distribution.quantizer=null",
               "noise.distribution.quantizers=[{quantizer:${quant.rtn4},weight:1},{quantizer:${quant.q4_0},weight:1},"
               "{quantizer:${quant.nf4},weight:1}]"]
ROWS: dict[str, list[str] | None] = {
    "pretrained": None,
    "control": ["noise=none"],
    "npft_fisher": [],
    # 4 midpoint intervals (the default 8 doubles the scoring cost; docs/npft_pqi.md ran with 4 too)
    "npft_pqi": ["outliers=pqi", "outliers.pqi_intervals=4"],
    "npft_paper_0.1": ["noise=npft_paper", "noise.scale=0.1"],
    "npft_per_epoch": ["noise.schedule=per_epoch"],
    # --- noise up to the exact quantization error (the "NPFT that pays off" screening)
    "step_2": ["outliers.ratio=2"],
    "step_10": ["outliers.ratio=10"],
    "step_all": ["outliers=all"],
    "qerr_0.5": ["noise=quant_error"],
    "qerr_2": ["noise=quant_error", "outliers.ratio=2"],
    "qerr_10": ["noise=quant_error", "outliers.ratio=10"],
    "qerr_damage_2": ["noise=quant_error", "outliers=damage", "outliers.ratio=2"],
    "qerr_all": ["noise=quant_error", "outliers=all"],                                   # low-rank QAT
    "qerr_all_p0.5": ["noise=quant_error", "outliers=all", "noise.distribution.probability=0.5"],
    "qerr_all_p0.25": ["noise=quant_error", "outliers=all", "noise.distribution.probability=0.25"],
    "qerr_all_mix0.5": ["noise=quant_error", "outliers=all", "noise.step_probability=0.5"],
    "qerr_all_mix0.25": ["noise=quant_error", "outliers=all", "noise.step_probability=0.25"],
    "qerr_all_mix0.15": ["noise=quant_error", "outliers=all", "noise.step_probability=0.15"],
    "qerr_all_mix0.1": ["noise=quant_error", "outliers=all", "noise.step_probability=0.1"],
    "qerr_all_s0.5": ["noise=quant_error", "outliers=all", "noise.scale=0.5"],
    "qerr_all_ramp": ["noise=quant_error", "outliers=all", "noise.ramp=linear"],
    "qerr_2_mix0.5": ["noise=quant_error", "outliers.ratio=2", "noise.step_probability=0.5"],
    "npft_paper": ["noise=npft_paper"],
    # --- issue 29's levers on the mixed objective: distillation on the perturbed steps, several target grids, the
    # perturbed steps in the last quarter (share 0.6 there: the same expected count as 0.15 over the whole run)
    "qerr_all_mix0.15_kd_self": ["noise=quant_error", "outliers=all", "noise.step_probability=0.15", "noise.distill.teacher=self"],
    "qerr_all_mix0.15_kd_frozen": ["noise=quant_error", "outliers=all", "noise.step_probability=0.15",
                                   "noise.distill.teacher=frozen"],
    "qerr_all_mix0.5_kd_self": ["noise=quant_error", "outliers=all", "noise.step_probability=0.5", "noise.distill.teacher=self"],
    "qerr_all_mix0.15_multi": ["noise=quant_error", "outliers=all", "noise.step_probability=0.15", *THREE_GRIDS],
    "qerr_all_last0.25": ["noise=quant_error", "outliers=all", "noise.step_probability=0.6", "noise.placement=last",
                          "noise.last_fraction=0.25"],
    # the next screen, after the first one (docs/screening_levers.md): distillation mixed with the data loss, more
    # perturbed steps per grid, a longer cooldown window at the default's expected count
    "qerr_all_mix0.15_kd_self_w0.5": ["noise=quant_error", "outliers=all", "noise.step_probability=0.15",
                                      "noise.distill.teacher=self", "noise.distill.weight=0.5", "noise.distill.temperature=2"],
    "qerr_all_mix0.5_multi": ["noise=quant_error", "outliers=all", "noise.step_probability=0.5", *THREE_GRIDS],
    "qerr_all_last0.5": ["noise=quant_error", "outliers=all", "noise.step_probability=0.3", "noise.placement=last",
                         "noise.last_fraction=0.5"],
    # --- whole recipes as their experiment configures them (own length, learning rate, outliers, schedule)
    "paper_recipe": ["experiment=npft_paper"],
    "paper_recipe_control": ["experiment=npft_paper", "noise=none"],
}
# Rows that run a recipe as its experiment configures it: the study base, --steps and --train-set (the study's own
# length and learning rate) do not apply to them, and each is paired with a control trained the same way (same
# experiment, noise=none) instead of the study's control. Value: the row's control (None: the row is a control).
RECIPE_ROWS: dict[str, str | None] = {"paper_recipe": "paper_recipe_control", "paper_recipe_control": None}
ROW_LABELS = {
    "pretrained": "pretrained",
    "control": "LoRA control (`noise=none`)",
    "npft_fisher": "NPFT as first built, Fisher outliers (`experiment=npft_fisher`)",
    "npft_pqi": "NPFT, PQI outliers (`outliers=pqi outliers.pqi_intervals=4`)",
    "npft_paper_0.1": "NPFT, reference-code noise ×0.1 (`noise=npft_paper noise.scale=0.1`)",
    "npft_per_epoch": "NPFT, one draw per epoch (`noise.schedule=per_epoch`)",
    # The reference code's noise distribution at this study's settings (the npft_fisher base: 0.5 % outliers, a fresh
    # draw every step; the final study's lr 2e-4), not the paper's recipe (experiment=npft_paper: lr 5e-6, 0.05 %,
    # per-epoch noise): label it so wherever it appears.
    "npft_paper": "the paper's noise in our setting, not the paper's recipe (`noise=npft_paper`)",
    "paper_recipe": "the paper's recipe (`experiment=npft_paper`: lr 5e-6, 3 epochs x 64 steps, 0.05 % Fisher outliers, per-epoch noise)",
    "paper_recipe_control": "LoRA control of the paper's recipe (`experiment=npft_paper noise=none`)",
    "qerr_all_mix0.15_kd_self": "mixed objective, its perturbed steps distilled from the clean model (`noise.distill.teacher=self`)",
    "qerr_all_mix0.15_kd_frozen": "mixed objective, its perturbed steps distilled from the model before fine-tuning (`noise.distill.teacher=frozen`)",
    "qerr_all_mix0.5_kd_self": "half the steps at the exact error, distilled from the clean model (`noise.step_probability=0.5 noise.distill.teacher=self`)",
    "qerr_all_mix0.15_multi": "mixed objective, each perturbed step towards one of RTN-4, `q4_0`, NF4 (`noise.distribution.quantizers=[...]`)",
    "qerr_all_last0.25": "mixed objective, its perturbed steps in the last quarter (`noise.placement=last noise.last_fraction=0.25 noise.step_probability=0.6`)",
    "qerr_all_mix0.15_kd_self_w0.5": "mixed objective, its perturbed steps half data loss, half distilled from the clean model at T = 2 (`noise.distill.teacher=self noise.distill.weight=0.5 noise.distill.temperature=2`)",
    "qerr_all_mix0.5_multi": "half the steps at the exact error, each towards one of RTN-4, `q4_0`, NF4",
    "qerr_all_last0.5": "30 % of the last half's steps at the exact error (`noise.placement=last noise.last_fraction=0.5 noise.step_probability=0.3`)",
}
QUANTIZERS = ["rtn4", "rtn3_g32", "gptq4", "gptq3_g32", "kmeans3", "cuberoot4", "nf4"]
# The config every row overrides: NPFT as first built (16 steps of step noise on 0.5 % Fisher outliers). Pinned,
# not train.py's default, so that the rows keep their meaning (and finished cells their reuse) when the default
# recipe changes.
STUDY_BASE = ["experiment=npft_fisher"]


def train_overrides(row: str, seed: int, steps: int | None, common: list[str], extra: list[str]) -> list[str]:
    """train.py's overrides for ``row`` at ``seed``: those of every call (``common``), the study base, the row's own,
    the study's --train-set (``extra``), then the seed and the length (``steps``; None keeps the recipe's).
    A recipe row (``RECIPE_ROWS``) gets only ``common``, its own and the seed."""
    if row in RECIPE_ROWS:
        return [*common, *ROWS[row], f"seed={seed}"]
    return [*common, *STUDY_BASE, *ROWS[row], *extra, f"seed={seed}", *([f"trainer.max_steps={steps}"] if steps else [])]


def base_row(key: str) -> str:
    """``qerr_all@64`` -> ``qerr_all`` (cells of a study over several training lengths are keyed ``row@steps``)."""
    return key.split("@", 1)[0]


def steps_of(key: str) -> int | None:
    return int(key.split("@", 1)[1]) if "@" in key else None


def control_of(key: str) -> str:
    """The control a row is paired with: the one trained for the same number of steps, or a recipe row's own."""
    if RECIPE_ROWS.get(base_row(key)):
        return RECIPE_ROWS[base_row(key)]
    return "control" + (key[key.index("@"):] if "@" in key else "")


def is_control(key: str) -> bool:
    """Whether the row is a control (the study's, or a recipe row's own): it is compared with nothing."""
    return base_row(key) == "control" or (base_row(key) in RECIPE_ROWS and RECIPE_ROWS[base_row(key)] is None)


def keyed_by_steps(table: dict[str, Any], steps: list[int] | None) -> dict[str, Any]:
    """Key the rows of a one-length study (``--steps N``: cells ``row``) as ``row@N``, like a study over several
    lengths, so that studies of different lengths can be merged; other tables are returned as they are."""
    if not steps or len(steps) != 1:
        return table
    return {k if k == "pretrained" or k in RECIPE_ROWS or "@" in k else f"{k}@{steps[0]}": v for k, v in table.items()}


def row_label(key: str) -> str:
    label = ROW_LABELS.get(base_row(key), "`" + " ".join(ROWS.get(base_row(key)) or []) + "`" if ROWS.get(base_row(key)) else base_row(key))
    return label + (f", {steps_of(key)} steps" if steps_of(key) else "")


def mean_std(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan")), len(values)


def gap_closed(ctrl_fp: float, ctrl_q: float, row_q: float) -> float:
    """Fraction of the control's quantization loss (its quantized − unquantized PPL) that the row's quantized PPL recovers.

    0 = quantizes like the control, 1 = the row's quantized PPL equals the control's unquantized PPL, < 0 = worse.
    """
    gap = ctrl_q - ctrl_fp
    return (ctrl_q - row_q) / gap if gap > 0 else float("nan")


def aggregate(cells: dict[str, dict[str, dict[str, dict[str, float]]]], quantizers: list[str]) -> dict[str, Any]:
    """``cells[row][seed][corpus][quantizer or 'fp']`` -> per-row mean ± std and the derived comparisons.

    Comparisons with the control are paired by seed (same data, steps and seed), then averaged.
    """
    columns = ["fp", *quantizers]
    corpora = list(dict.fromkeys(c for seeds in cells.values() for per in seeds.values() for c in per))
    table: dict[str, Any] = {}
    for corpus in corpora:
        table[corpus] = {}
        for row, seeds in cells.items():
            table[corpus][row] = {q: dict(zip(("mean", "std", "n"), mean_std([s.get(corpus, {}).get(q) for s in seeds.values()])))
                                  for q in columns}
    derived: dict[str, Any] = {}
    for corpus in corpora:
        derived[corpus] = {}
        for row, seeds in cells.items():
            if row == "pretrained" or is_control(row):
                continue
            control = cells.get(control_of(row), {})
            per_q = {}
            for q in columns:
                paired = [(control[s][corpus], seeds[s][corpus]) for s in seeds if s in control and corpus in control[s] and corpus in seeds[s]]
                rel = [100 * (r[q] / c[q] - 1) for c, r in paired if q in c and q in r]
                closed = [gap_closed(c["fp"], c[q], r[q]) for c, r in paired if q != "fp" and q in c and q in r]
                per_q[q] = {"vs_control_pct": dict(zip(("mean", "std", "n"), mean_std(rel)))}
                if q != "fp":
                    per_q[q]["gap_closed"] = dict(zip(("mean", "std", "n"), mean_std(closed)))
            derived[corpus][row] = per_q
        gptq_pre = table[corpus].get("pretrained", {}).get("gptq4", {}).get("mean")
        if gptq_pre is not None and "rtn4" in quantizers and math.isfinite(gptq_pre):
            derived[corpus]["rtn4_vs_pretrained_gptq4"] = {
                row: {"rtn4": stats["rtn4"]["mean"], "pretrained_gptq4": gptq_pre, "reaches": stats["rtn4"]["mean"] <= gptq_pre}
                for row, stats in table[corpus].items() if math.isfinite(stats["rtn4"]["mean"])}
    return {"table": table, "derived": derived}


def train_timing(plan: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``timing[row][seed]``: the training wall time and median batch time each finished run recorded
    (runs older than the step clock recorded none and are left out)."""
    timing: dict[str, dict[str, dict[str, float]]] = {}
    for step in plan:
        path = Path(step["dir"]) / "metrics.json"
        if step["kind"] != "train" or not path.is_file():
            continue
        train = json.loads(path.read_text()).get("train", {})
        if train.get("median_batch_seconds") and train.get("train_seconds"):
            timing.setdefault(step["row"], {})[str(step["seed"])] = {
                k: float(train[k]) for k in ("train_seconds", "median_batch_seconds")}
    return timing
