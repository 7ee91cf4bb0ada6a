"""The rows, columns and derived numbers of the llama.cpp study (bench/llamacpp_study.py): each row's train.py
recipe, the file types eval.py asks llama.cpp's quantizer for, and per corpus the mean ± std over seeds with the
comparisons of issue 28's targets, paired by seed with the no-noise control (pure functions of the per-cell PPLs)."""

from __future__ import annotations

from typing import Any

from common import ROOT, StudyError
from quality_rows import gap_closed, mean_std

# Row -> train.py overrides (None: the model as loaded). Every recipe derives from npft_smollm2 (256 steps at lr
# 2e-4), so one control, the same recipe without noise, stands beside them all.
ROWS: dict[str, list[str] | None] = {
    "pretrained": None,
    "control": ["experiment=npft_smollm2", "noise=none"],
    "default": ["experiment=npft_smollm2"],
    "mixed_q4_0": ["experiment=mixed_q4_0"],
    "mixed_q4_k": ["experiment=mixed_q4_k"],
    "mixed_q4_0_imatrix": ["experiment=mixed_q4_0_imatrix"],
    "mixed_q4_k_imatrix": ["experiment=mixed_q4_k_imatrix"],
    "qat_q4_0": ["experiment=qat_q4_0"],
    "qat_q4_0_imatrix": ["experiment=qat_q4_0_imatrix"],
    "qat_q4_k": ["experiment=qat_q4_k"],
    "qat_q4_k_imatrix": ["experiment=qat_q4_k_imatrix"],
    # Three quarters of the steps at the imatrix file's error: does a smaller share keep most of qat_q4_k_imatrix's
    # gain (0.54 of the Q4_K_M gap) inside the +1 % unquantized budget it overshoots (+1.22 %)?
    "qat75_q4_k_imatrix": ["experiment=qat_q4_k_imatrix", "noise.step_probability=0.75"],
    "qat_rtn4": ["experiment=qat_rtn4"],
}
ROW_LABELS = {
    "pretrained": "pretrained",
    "control": "LoRA control (`noise=none`)",
    "default": "default recipe (mixed, RTN-4)",
}
STUDY_ROWS = ["pretrained", "control", "default", "mixed_q4_0", "mixed_q4_k"]
CONTROL = "control"
F32 = "F32"  # the unquantized model, as llama.cpp scores it (eval.py's float GGUF)
IMATRIX = "+imatrix"
# The files of issue 28's table: eval.py's labels (tasks/llamacpp_files.py), TYPE or TYPE+imatrix.
COLUMNS = ["Q4_0", "Q4_0+imatrix", "Q4_K_M", "Q4_K_M+imatrix", "IQ4_XS+imatrix", "Q5_K_M", "Q8_0"]


def row_label(row: str) -> str:
    overrides = ROWS.get(row)
    return ROW_LABELS.get(row, f"`{' '.join(overrides)}`" if overrides else row)


def check_rows(rows: list[str]) -> None:
    """Each recipe row's experiment config exists in this checkout (one line naming the row and the file, else)."""
    for row in rows:
        for override in ROWS[row] or []:
            name = override.removeprefix("experiment=")
            if name != override and not (ROOT / "conf" / "experiment" / f"{name}.yaml").is_file():
                raise StudyError(f"row {row} trains experiment={name}, but conf/experiment/{name}.yaml is not in this checkout; "
                                 f"drop {row} from --rows or run the study on a branch that has it")


def train_overrides(row: str, seed: int, steps: int | None, common: list[str], extra: list[str]) -> list[str]:
    """train.py's overrides for ``row`` at ``seed``: those of every call (``common``), the row's recipe, the study's
    --train-set (``extra``), then the seed and the length (``steps``; None keeps the recipe's)."""
    return [*common, *ROWS[row], *extra, f"seed={seed}", *([f"trainer.max_steps={steps}"] if steps else [])]


def column_label(text: str) -> str:
    """A --columns value as eval.py labels its file: ``q4_k_m+imatrix`` -> ``Q4_K_M+imatrix``."""
    with_imatrix = text.lower().endswith(IMATRIX)
    return text[:len(text) - len(IMATRIX) * with_imatrix].upper() + IMATRIX * with_imatrix


def file_types(columns: list[str]) -> tuple[list[str], bool | str]:
    """eval.py's ``llamacpp_types`` and ``imatrix`` that make the files of ``columns`` (TYPE or TYPE+imatrix).

    The imatrix setting is one for all types: with both kinds of column every type is made with and without it
    (the extra files are scored and kept in the JSON, not shown in the tables).
    """
    types = list(dict.fromkeys(c.removesuffix(IMATRIX).upper() for c in columns))
    with_imatrix = {c.endswith(IMATRIX) for c in columns}
    return types, "both" if len(with_imatrix) == 2 else with_imatrix == {True}


def imatrix_pairs(columns: list[str]) -> list[str]:
    """The types of ``columns`` made both without and with the imatrix."""
    return [c for c in columns if not c.endswith(IMATRIX) and c + IMATRIX in columns]


def summary(values: list[float]) -> dict[str, float]:
    return dict(zip(("mean", "std", "n"), mean_std(values)))


def aggregate(cells: dict[str, dict[str, dict[str, dict[str, float]]]], columns: list[str]) -> dict[str, Any]:
    """``cells[row][seed][corpus][F32 or column]`` (llama.cpp PPLs) -> per-row mean ± std and the derived numbers.

    Per corpus and trained row (the control aside), paired by seed with the control: ``vs_control_pct`` (PPL
    change of each file against the control's file of the same column, F32 = the unquantized cost),
    ``gap_closed`` (of the control's gap at that column), ``vs_control_imatrix_pct`` (the row's TYPE file against
    the control's TYPE+imatrix file: does the recipe alone beat the control with an imatrix?) and, for every row,
    ``imatrix_gain_pct`` (its TYPE+imatrix file against its own TYPE file).
    """
    all_columns = [F32, *columns]
    corpora = list(dict.fromkeys(c for seeds in cells.values() for per in seeds.values() for c in per))
    table: dict[str, Any] = {}
    derived: dict[str, Any] = {}
    for corpus in corpora:
        table[corpus] = {row: {c: summary([s.get(corpus, {}).get(c) for s in seeds.values()]) for c in all_columns}
                         for row, seeds in cells.items()}
        derived[corpus] = {}
        control = cells.get(CONTROL, {})
        for row, seeds in cells.items():
            own = [per[corpus] for per in seeds.values() if corpus in per]
            out: dict[str, Any] = {"imatrix_gain_pct": {
                t: summary([100 * (p[t + IMATRIX] / p[t] - 1) for p in own if t in p and t + IMATRIX in p]) for t in imatrix_pairs(columns)}}
            if row not in ("pretrained", CONTROL):
                paired = [(control[s][corpus], per[corpus]) for s, per in seeds.items() if corpus in per and corpus in control.get(s, {})]
                out["vs_control_pct"] = {c: summary([100 * (r[c] / k[c] - 1) for k, r in paired if c in k and c in r]) for c in all_columns}
                out["gap_closed"] = {c: summary([gap_closed(k[F32], k[c], r[c]) for k, r in paired if F32 in k and c in k and c in r])
                                     for c in columns}
                out["vs_control_imatrix_pct"] = {
                    t: summary([100 * (r[t] / k[t + IMATRIX] - 1) for k, r in paired if t in r and t + IMATRIX in k])
                    for t in imatrix_pairs(columns)}
            derived[corpus][row] = out
    return {"table": table, "derived": derived}
