"""The quality study: does NPFT make a model quantize better than the no-noise LoRA control?

Rows (each training row once per seed, same data / steps / seed as the control):

  pretrained       the model as loaded (no training)
  control          LoRA without noise (noise=none)
  npft_fisher      NPFT, the default recipe (Fisher outliers, step-matched uniform noise, per step)
  npft_pqi         NPFT with PQI outlier targeting (outliers=pqi, 4 intervals)
  npft_paper_0.1   NPFT with the reference code's noise at scale 0.1 (noise=npft_paper noise.scale=0.1)
  npft_per_epoch   NPFT with one noise draw per epoch (noise.schedule=per_epoch)

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
measured the same way (model, windows, corpora, overrides): studies run in separate folders or sessions.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any, Iterator

from common import ROOT, load_config, machine, write_json
from tqdm.auto import tqdm

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
}
ROW_LABELS = {
    "pretrained": "pretrained",
    "control": "LoRA control (`noise=none`)",
    "npft_fisher": "NPFT, Fisher outliers (default)",
    "npft_pqi": "NPFT, PQI outliers (`outliers=pqi outliers.pqi_intervals=4`)",
    "npft_paper_0.1": "NPFT, reference-code noise ×0.1 (`noise=npft_paper noise.scale=0.1`)",
    "npft_per_epoch": "NPFT, one draw per epoch (`noise.schedule=per_epoch`)",
    "npft_paper": "the paper's noise (`noise=npft_paper`)",
}
QUANTIZERS = ["rtn4", "rtn3_g32", "gptq4", "gptq3_g32", "kmeans3", "cuberoot4", "nf4"]
CORPORA = {"wiki": "Wikipedia test split", "pydoc": "Python 3.11 manual (out of domain)",
           "wiki_val": "Wikipedia validation split (screening)"}
DEFAULT_CORPORA = ["wiki", "pydoc"]  # the final study's columns; wiki_val is for screening only
# Training is done once per row and seed; validation during training is redundant with eval.py (one window
# keeps the before/after table cheap).
TRAIN_FIXED = ["quant=none", "curvature=null", "data.max_eval_windows=1"]
# The config every row overrides: NPFT as first built (16 steps of step noise on 0.5 % Fisher outliers). Pinned,
# not train.py's default, so that the rows keep their meaning (and finished cells their reuse) when the default
# recipe changes.
STUDY_BASE = ["experiment=npft_fisher"]
# The parts of a training config that determine the adapter (what a reused run must match).
TRAIN_KEYS = ("seed", "model", "data", "peft", "outliers", "noise", "optimizer", "schedule", "trainer", "gradient_checkpointing")
IGNORED_KEYS = {"cache_dir", "default_root_dir", "max_eval_windows", "eval_batch_size", "enable_progress_bar", "progress"}
BLOCK_BEGIN, BLOCK_END = "<!-- quality:begin (generated by bench/quality.py) -->", "<!-- quality:end -->"
PYDOC_DEB = "python3.11-doc"
PYDOC_INFO = "usr/share/info/python3.11.info.gz"


class StudyError(Exception):
    """A problem with the study's input; printed as one line."""


# --------------------------------------------------------------------------------------------
# Corpora
# --------------------------------------------------------------------------------------------


def info_nodes(text: str) -> Iterator[tuple[str, str]]:
    """(node name, body) of each node of a GNU info file, without header lines, menus and index nodes."""
    for chunk in text.split("\x1f")[1:]:
        lines = chunk.strip("\n").split("\n")
        match = re.match(r"File: [^,]+,\s+Node: ([^,]+)", lines[0]) if lines else None
        if not match:
            continue  # the tag table and other non-node chunks
        name = match.group(1).strip()
        if "Index" in name:
            continue
        body = "\n".join(lines[1:])
        body = re.split(r"^\* Menu:\s*$", body, maxsplit=1, flags=re.M)[0]  # the menu is a list of links
        if body.strip():
            yield name, body.strip()


def prepare_python_doc(cache: Path, max_chars: int) -> tuple[Path, dict[str, Any]]:
    """The out-of-domain evaluation text: the test share (by node-name hash) of the Python manual, as .jsonl.

    Downloads the Debian package once (apt-get download + dpkg-deb -x: no install, no system change).
    """
    from npft_lightning.lm.corpora import split_of

    folder = cache / "corpora" / PYDOC_DEB
    out = folder / f"test-{max_chars}.jsonl"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        return out, json.loads(meta_path.read_text())
    info = folder / "x" / PYDOC_INFO
    if not info.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", PYDOC_DEB], cwd=folder, check=True, capture_output=True, text=True)
            deb = sorted(folder.glob(f"{PYDOC_DEB}_*_all.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "x")], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError, IndexError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise StudyError(f"cannot fetch {PYDOC_DEB} with apt-get download ({detail.strip()[:200]}); "
                             "pass --ood-text FILE with any .txt/.jsonl text instead") from err
    deb = sorted(folder.glob(f"{PYDOC_DEB}_*_all.deb"))
    text = gzip.decompress(info.read_bytes()).decode("utf-8", errors="replace")
    nodes = [(name, body) for name, body in info_nodes(text) if split_of(name) == "test"]
    # Evenly spaced over the whole manual (tutorial, reference, library, HOWTOs...), not its first chapters.
    fraction = min(1.0, max_chars / max(sum(len(body) for _, body in nodes), 1))
    kept = [(n, b) for i, (n, b) in enumerate(nodes) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    records = [json.dumps({"node": name, "text": body}, ensure_ascii=False) for name, body in kept]
    total = sum(len(body) for _, body in kept)
    from npft_lightning.core.io import atomic_write_text

    atomic_write_text(out, "\n".join(records) + "\n")
    meta = {"source": deb[-1].name if deb else PYDOC_DEB, "file": PYDOC_INFO, "nodes": len(records), "chars": total,
            "selection": "info nodes (menus and index nodes dropped) with sha1(node name) % 20 == 0, in file order, "
                         f"evenly thinned to about {max_chars} characters",
            "sha1": hashlib.sha1(out.read_bytes()).hexdigest()}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return out, meta


def prepare_wiki_split(cache: Path, corpus_overrides: list[str], split: str) -> Path:
    """One split of the Wikipedia corpus as .jsonl, so one ``data=text_files`` eval can score both corpora
    (the train split calibrates GPTQ / k-means, the test split is the in-domain column)."""
    from hydra.utils import instantiate

    from npft_lightning.core.io import atomic_write_text
    from npft_lightning.lm.corpora.text_files import TextFiles

    with tempfile.TemporaryDirectory() as tmp:
        corpus = instantiate(load_config(corpus_overrides, tmp).data.corpus)
    out = cache / "corpora" / f"{corpus.name}-{split}-{corpus.fingerprint().replace('|', '_')[-16:]}.jsonl"
    if not out.is_file():
        docs = corpus.documents(split)
        atomic_write_text(out, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        if TextFiles(train=str(out), test=str(out)).text("train") != corpus.text(split):
            out.unlink()
            raise StudyError(f"the {split} split of {corpus.name} does not survive the .jsonl round trip; "
                             "cannot score it next to the out-of-domain text")
    return out


# --------------------------------------------------------------------------------------------
# Cells
# --------------------------------------------------------------------------------------------


def strip_ignored(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: strip_ignored(v) for k, v in tree.items() if k not in IGNORED_KEYS}
    if isinstance(tree, list):
        return [strip_ignored(v) for v in tree]
    return tree


def train_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved training config that determines the trained adapter."""
    return strip_ignored({k: config.get(k) for k in TRAIN_KEYS})


def config_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key where two nested dicts differ, with both values; None when equal."""
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = config_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}: {va!r} vs {vb!r}"
    return None


def expected_train_signature(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides, tmp)
        return train_signature(OmegaConf.to_container(cfg, resolve=True))


def finished_train(run_dir: Path, signature: dict[str, Any]) -> tuple[bool, str | None]:
    """Whether ``run_dir`` holds a finished training run (metrics.json + adapter) of this config, and if not why."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return False, "no metrics.json"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        return False, "no adapter/adapter_config.json"
    diff = config_difference(train_signature(metrics.get("config") or {}), signature)
    return diff is None, (f"its config differs at {diff}" if diff else None)


def finished_eval(cell: Path, command: list[str]) -> dict[str, Any] | None:
    """The metrics of an eval cell that already ran this exact command, else None."""
    try:
        if json.loads((cell / "command.json").read_text())[1:] != command[1:]:  # [0] is the interpreter
            return None
        return json.loads((cell / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def held(lock: str | None) -> Iterator[None]:
    """Hold an exclusive flock on ``lock`` (to share a machine with other heavy jobs), or nothing."""
    if not lock:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_cell(command: list[str], log: Path, lock: str | None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HYDRA_FULL_ERROR": "1"}
    with held(lock), open(log, "w") as out:
        out.write("$ " + shlex.join(command) + "\n")
        out.flush()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"exit code {code}: {shlex.join(command)}\n  " + "\n  ".join(tail))


# --------------------------------------------------------------------------------------------
# Aggregation (pure functions of the per-cell PPLs)
# --------------------------------------------------------------------------------------------


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


def base_row(key: str) -> str:
    """``qerr_all@64`` -> ``qerr_all`` (cells of a study over several training lengths are keyed ``row@steps``)."""
    return key.split("@", 1)[0]


def steps_of(key: str) -> int | None:
    return int(key.split("@", 1)[1]) if "@" in key else None


def control_of(key: str) -> str:
    """The control a row is paired with: the one trained for the same number of steps."""
    return "control" + (key[key.index("@"):] if "@" in key else "")


# What two studies must share for their cells to stand in one table (rows and seeds may differ).
MERGE_SETTINGS = ("model", "max_eval_windows", "calib_windows", "eval_seq_len", "overrides", "train_overrides", "eval_overrides")


def keyed_by_steps(table: dict[str, Any], steps: list[int] | None) -> dict[str, Any]:
    """Key the rows of a one-length study (``--steps N``: cells ``row``) as ``row@N``, like a study over several
    lengths, so that studies of different lengths can be merged; other tables are returned as they are."""
    if not steps or len(steps) != 1:
        return table
    return {k if k == "pretrained" or "@" in k else f"{k}@{steps[0]}": v for k, v in table.items()}


def load_merged_study(path: Path, settings: dict[str, Any], corpora: list[str]) -> dict[str, Any]:
    """An earlier study's --out-json, checked to be measured like this one (``MERGE_SETTINGS``, corpora, quantizers)."""
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"--merge {path}: cannot read it ({err}); give the --out-json of an earlier bench/quality.py run") from None
    if not isinstance(other, dict) or other.get("bench") != "quality" or not isinstance(other.get("cells"), dict):
        raise StudyError(f"--merge {path}: not a quality study's JSON (no bench=quality with cells); give an earlier --out-json")
    theirs = other.get("settings", {})
    for key in MERGE_SETTINGS:
        if theirs.get(key) != settings[key]:
            raise StudyError(f"--merge {path}: its {key} is {theirs.get(key)!r}, this study's {settings[key]!r}; "
                             f"only studies measured the same way share a table")
    if sorted(other.get("corpora", {})) != sorted(corpora):
        raise StudyError(f"--merge {path}: it scored corpora {sorted(other.get('corpora', {}))}, this study {sorted(corpora)}; "
                         f"pass the same --corpora")
    missing = [q for q in settings["quantizers"] if q not in theirs.get("quantizers", [])]
    if missing:
        raise StudyError(f"--merge {path}: it has no {', '.join(missing)} column; drop {' '.join(missing)} from --quantizers or merge a study that has them")
    return other


def merge_studies(cells: dict[str, Any], timing: dict[str, Any], others: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """This study's cells and step clocks plus those of ``others`` for the (row, seed) pairs this study lacks:
    a cell measured here wins over an earlier copy of it."""
    cells = {k: dict(v) for k, v in cells.items()}
    timing = {k: dict(v) for k, v in timing.items()}
    for other in others:
        steps = other.get("settings", {}).get("steps")
        for mine, theirs in ((cells, keyed_by_steps(other["cells"], steps)), (timing, keyed_by_steps(other.get("timing", {}), steps))):
            for key, seeds in theirs.items():
                for seed, value in seeds.items():
                    mine.setdefault(key, {}).setdefault(seed, value)
    return cells, timing


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
            if row == "pretrained" or base_row(row) == "control":
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


def render_timing(timing: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Markdown lines: per row the median batch time, its ratio to the control of the same seed and length, and the
    training wall time (runs made one after the other on one machine: the ratios, not the seconds, carry over)."""
    if not timing:
        return []
    lines = ["", "Training time (median seconds per batch; ratio to the control of the same seed and length; training "
             "wall time in minutes, mean over seeds):", "", "| row | s / batch | ratio vs control | training min |", "|---|---:|---:|---:|"]
    for row, seeds in timing.items():
        control = timing.get(control_of(row), {})
        ratios = [t["median_batch_seconds"] / control[s]["median_batch_seconds"] for s, t in seeds.items() if s in control]
        per_batch = statistics.fmean(t["median_batch_seconds"] for t in seeds.values())
        minutes = statistics.fmean(t["train_seconds"] for t in seeds.values()) / 60
        ratio = f"{statistics.fmean(ratios):.3f}" if ratios and base_row(row) != "control" else "—"
        lines.append(f"| {row_label(row)} | {per_batch:.2f} | {ratio} | {minutes:.1f} |")
    return lines


def row_label(key: str) -> str:
    label = ROW_LABELS.get(base_row(key), "`" + " ".join(ROWS.get(base_row(key)) or []) + "`" if ROWS.get(base_row(key)) else base_row(key))
    return label + (f", {steps_of(key)} steps" if steps_of(key) else "")


def _cell(stat: dict[str, Any], digits: int = 2) -> str:
    if stat["n"] == 0:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def render_markdown(result: dict[str, Any]) -> str:
    """The generated block of docs/results.md: one table per corpus, then the derived comparisons."""
    s = result["settings"]
    quantizers, agg = s["quantizers"], result["aggregate"]
    names = ["unquantized" if q == "fp" else q for q in ["fp", *quantizers]]
    lines = [BLOCK_BEGIN, "", f"Generated {result['date']} by:", "", "```bash", result["command"], "```", ""]
    for merged in s.get("merged", []):
        lines += [f"with the cells of `{merged['json']}`, made by:", "", "```bash", merged["command"], "```", ""]
    lines.append(f"{'**Reduced study.** ' if s['reduced'] else ''}Model `{s['model']}`; seeds {s['seeds']}; "
                 f"training steps {s['steps'] or 'the recipe default'}; eval windows per corpus "
                 f"{s['max_eval_windows'] or 'all'} × {s['eval_seq_len']} tokens; GPTQ calibration "
                 f"{s['calib_windows'] or 'conf/calibration default'} windows of the Wikipedia train split. "
                 "Perplexity, mean ± std over seeds (no ± with one seed).")
    for corpus, rows in agg["table"].items():
        meta = result["corpora"].get(corpus, {})
        lines += ["", f"#### {CORPORA.get(corpus, corpus)}" + (f" ({meta['tokens']:,} tokens scored)" if meta.get("tokens") else ""), "",
                  "| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row, stats in rows.items():
            lines.append(f"| {row_label(row)} | " + " | ".join(_cell(stats[q]) for q in ["fp", *quantizers]) + " |")
        derived = agg["derived"].get(corpus, {})
        npft_rows = [r for r in derived if r != "rtn4_vs_pretrained_gptq4"]
        if npft_rows:
            lines += ["", "PPL change against the control, paired by seed (%; negative = better):", "",
                      "| row | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
            for row in npft_rows:
                cells = [_cell(derived[row][q]["vs_control_pct"]) for q in ["fp", *quantizers]]
                lines.append(f"| {row_label(row)} | " + " | ".join(c if c == "—" or c.startswith("-") else "+" + c for c in cells) + " |")
            lines += ["", "Fraction of the control's quantization gap closed, (q_ctrl − q_row) / (q_ctrl − fp_ctrl), paired by seed "
                      "(1 = quantized as good as the control unquantized; 0 = no better than the control; — where the control has no gap):", "",
                      "| row | " + " | ".join(names[1:]) + " |", "|---|" + "---|" * len(quantizers)]
            for row in npft_rows:
                lines.append(f"| {row_label(row)} | " + " | ".join(_cell(derived[row][q]["gap_closed"]) for q in quantizers) + " |")
        reach = derived.get("rtn4_vs_pretrained_gptq4")
        if reach:
            lines += ["", "RTN-4 after training vs GPTQ-4 on the pretrained model "
                      f"({next(iter(reach.values()))['pretrained_gptq4']:.2f}): " + "; ".join(
                          f"{row_label(r)} {v['rtn4']:.2f} ({'reaches it' if v['reaches'] else 'does not'})"
                          for r, v in reach.items() if r != "pretrained")]
    lines += render_timing(result.get("timing", {}))
    lines += ["", BLOCK_END]
    return "\n".join(lines)


def plot_quality(result: dict[str, Any], path: Path) -> Path | None:
    """PPL change against the control per column (mean ± std over seeds, paired), one panel per corpus, a bar per NPFT row.

    Below zero the row beats the no-noise control; the unquantized column shows what the noise costs.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    from npft_lightning.tasks.figures import save_figure

    quantizers = result["settings"]["quantizers"]
    columns = ["fp", *quantizers]
    derived = {c: {r: v for r, v in rows.items() if r != "rtn4_vs_pretrained_gptq4"} for c, rows in result["aggregate"]["derived"].items()}
    derived = {c: rows for c, rows in derived.items() if rows}
    if not derived:
        return None
    fig, axes = plt.subplots(len(derived), 1, figsize=(1.1 * len(columns) + 3, 3.4 * len(derived)), squeeze=False)
    for ax, (corpus, rows) in zip(axes.flat, derived.items()):
        width = 0.8 / len(rows)
        for i, (row, per_q) in enumerate(rows.items()):
            stats = [per_q[q]["vs_control_pct"] for q in columns]
            xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(columns))]
            ax.bar(xs, [st["mean"] for st in stats], width, yerr=[st["std"] if st["n"] > 1 else 0 for st in stats],
                   capsize=2, label=row_label(row), color=f"C{i}")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(columns)), ["unquantized" if q == "fp" else q for q in columns])
        ax.set_ylabel("PPL vs control (%)")
        ax.set_title(CORPORA.get(corpus, corpus))
        ax.grid(axis="y", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    seeds = result["settings"]["seeds"]
    fig.suptitle(f"PPL change against the no-noise LoRA control, paired by seed (mean ± std, seeds {seeds}); below 0 = better")
    return save_figure(fig, path)


def _derived_rows(result: dict[str, Any], corpus: str) -> dict[str, Any]:
    rows = result["aggregate"]["derived"].get(corpus, {})
    return {r: v for r, v in rows.items() if r != "rtn4_vs_pretrained_gptq4"}


def _corpus_for_plots(result: dict[str, Any]) -> str | None:
    derived = result["aggregate"]["derived"]
    return next((c for c in ("wiki", "wiki_val", *derived) if _derived_rows(result, c)), None)


def plot_gap_vs_steps(result: dict[str, Any], path: Path, quantizer: str = "rtn4") -> Path | None:
    """Gap closed beyond the control (paired by seed) against training steps, one line per configuration.

    Drawn when the study trained rows at several lengths (cells keyed ``row@steps``): it shows whether
    longer training would close more of the gap.
    """
    corpus = _corpus_for_plots(result)
    rows = _derived_rows(result, corpus) if corpus else {}
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for key, per_q in rows.items():
        stat = per_q.get(quantizer, {}).get("gap_closed")
        if steps_of(key) is None or not stat or stat["n"] == 0:
            continue
        lines.setdefault(base_row(key), []).append((steps_of(key), stat["mean"], stat["std"] if stat["n"] > 1 else 0.0))
    if not any(len(v) > 1 for v in lines.values()):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npft_lightning.tasks.figures import save_figure

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (row, points) in enumerate(sorted(lines.items())):
        points.sort()
        ax.errorbar([p[0] for p in points], [100 * p[1] for p in points], yerr=[100 * p[2] for p in points],
                    marker="o", capsize=2, label=row_label(row), color=f"C{i % 10}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training steps (optimizer steps of 2 × 512 tokens)")
    ax.set_ylabel(f"{quantizer} gap closed beyond the control (%)")
    ax.set_title(f"{CORPORA.get(corpus, corpus)}: does longer training close more?", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    return save_figure(fig, path)


def plot_frontier(result: dict[str, Any], path: Path, quantizer: str = "rtn4") -> Path | None:
    """The trade-off: gap closed at ``quantizer`` against the unquantized PPL cost, both vs the control, one point per configuration."""
    corpus = _corpus_for_plots(result)
    rows = _derived_rows(result, corpus) if corpus else {}
    points = [(key, per_q["fp"]["vs_control_pct"]["mean"], per_q[quantizer]["gap_closed"]["mean"])
              for key, per_q in rows.items() if quantizer in per_q and per_q[quantizer]["gap_closed"]["n"] > 0]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from npft_lightning.tasks.figures import save_figure

    marked = {result["settings"].get("default_row"): "default recipe", result["settings"].get("deploy_row"): "deployment recipe"}
    fig, ax = plt.subplots(figsize=(8, 5))
    for key, cost, closed in points:
        paper = base_row(key).startswith("npft_paper")
        ax.scatter([cost], [100 * closed], marker="s" if paper else "o", color="C3" if paper else "C0",
                   edgecolors="black" if key in marked else "none", s=60 if key in marked else 25, zorder=3)
        label = key + (f" ({marked[key]})" if key in marked else "") + (" (the paper's noise)" if paper else "")
        ax.annotate(label, (cost, 100 * closed), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("unquantized PPL vs the control (%; right = costs more)")
    ax.set_ylabel(f"{quantizer} gap closed beyond the control (%)")
    costs = [p[1] for p in points]
    ax.set_xlim(min(0.0, *costs) - 0.5, max(1.5, *costs) + 0.5)  # the control (0) and the +1 % line always in view
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_title(f"{CORPORA.get(corpus, corpus)}:\nwhat the quantized model gains against what the unquantized one pays", fontsize=10)
    ax.axvline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.text(1.0, ax.get_ylim()[1], " +1 % unquantized", fontsize=7, va="top", color="grey")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def write_results_block(path: Path, block: str, begin: str = BLOCK_BEGIN, end: str = BLOCK_END) -> None:
    """Replace the generated block (``begin`` ... ``end``) of ``path`` (or append it), keeping the hand-written text around it."""
    from npft_lightning.core.io import atomic_write_text

    text = path.read_text() if path.is_file() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    print(f"wrote {path}")


# --------------------------------------------------------------------------------------------
# The study
# --------------------------------------------------------------------------------------------


def corpus_setup(args: argparse.Namespace, cache: Path, common: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str], list[str]]:
    """The corpora to score (``args.corpora``, ``args.ood_text``, ``args.ood_chars``): their metadata, the eval.py
    split each is scored as, those splits in order, and the eval.py overrides that set them up."""
    corpora: dict[str, dict[str, Any]] = {}
    if "wiki" in args.corpora:
        corpora["wiki"] = {"source": "wiki_vital test split"}
    # Both corpora are scored by one eval.py process (each quantizer, GPTQ's calibration included, runs once
    # per model): its `validation` split is the Wikipedia test split, its `test` split the out-of-domain text.
    split_of_corpus = {"wiki": "test"}
    if "wiki_val" in args.corpora:  # the screening column: the validation split, so the test split stays unseen
        if "pydoc" in args.corpora:
            raise StudyError("--corpora wiki_val (screening) cannot be combined with pydoc; screen first, then run the final study")
        corpora["wiki_val"] = {"source": "wiki_vital validation split"}
        split_of_corpus["wiki_val"] = "validation"
    corpus_overrides: list[str] = []
    if "pydoc" in args.corpora:
        if args.ood_text:
            ood, meta = Path(args.ood_text).expanduser().resolve(), {"source": args.ood_text}
        else:
            ood, meta = prepare_python_doc(cache, args.ood_chars)
        corpora["pydoc"] = meta
        wiki_test = prepare_wiki_split(cache, common, "test") if "wiki" in corpora else ood
        corpus_overrides = ["data=text_files", f"data.corpus.train={prepare_wiki_split(cache, common, 'train')}",
                            f"data.corpus.validation={wiki_test}", f"data.corpus.test={ood}"]
        split_of_corpus = {"wiki": "validation", "pydoc": "test"}
    split_of_corpus = {c: s for c, s in split_of_corpus.items() if c in corpora}
    splits = sorted(split_of_corpus.values(), key=["validation", "test"].index)
    return corpora, split_of_corpus, splits, corpus_overrides


def run_plan(plan: list[dict[str, Any]], lock: str | None, dry_run: bool, desc: str,
             finished_only: bool = False) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], int, int, list[str]]:
    """Run a study's cells in order and return (eval step, its metrics) of every finished eval, the number of
    cells run and reused, and the failures.

    A ``train`` step is skipped when its folder holds a finished run of the same config; its ``reuse`` (the
    --reuse argument it came from) makes an unusable run stop the study. An ``eval`` step is skipped when its
    metrics exist for the same command, and left out when the training in its ``after`` folder failed.
    ``dry_run`` prints the commands still to run instead; ``finished_only`` runs nothing and returns the
    evals that have finished (to write the tables of a study that is still running).
    """
    from npft_lightning.core.io import atomic_write_json

    evals, failures, ran, skipped = [], [], 0, 0
    failed_train: set[Path] = set()
    for step in tqdm(plan, desc=desc, disable=dry_run):
        if step["kind"] == "train":
            done, why = finished_train(step["dir"], expected_train_signature(step["overrides"]))
            if step.get("reuse") and not done:
                raise StudyError(f"--reuse {step['reuse']} cannot be used: {why}")
            if done:
                skipped += 1
            elif finished_only:
                failed_train.add(step["dir"])  # not trained yet: its eval is left out
            elif dry_run:
                print(shlex.join(step["command"]))
            else:
                try:
                    run_cell(step["command"], step["dir"] / "driver.log", lock)
                    ran += 1
                except RuntimeError as err:
                    failures.append(str(err))
                    failed_train.add(step["dir"])
            continue
        command = [*step["command"], f"hydra.run.dir={step['dir']}"]
        metrics = finished_eval(step["dir"], command)
        if metrics is None:
            if dry_run:
                print(shlex.join(command))
                continue
            if step.get("after") in failed_train or finished_only:
                continue
            try:
                run_cell(command, step["dir"] / "driver.log", lock)
                atomic_write_json(step["dir"] / "command.json", command)
                metrics = json.loads((step["dir"] / "metrics.json").read_text())
                ran += 1
            except RuntimeError as err:
                failures.append(str(err))
                continue
        else:
            skipped += 1
        evals.append((step, metrics))
    return evals, ran, skipped, failures


def parse_reuse(values: list[str]) -> dict[tuple[str, int], Path]:
    reuse = {}
    for value in values:
        match = re.fullmatch(r"([\w.]+):(\d+)=(.+)", value)
        if not match or match.group(1) not in ROWS or match.group(1) == "pretrained":
            raise StudyError(f"--reuse {value!r}: write ROW:SEED=RUN_DIR with ROW one of {', '.join(r for r in ROWS if r != 'pretrained')}")
        reuse[(match.group(1), int(match.group(2)))] = Path(match.group(3)).expanduser().resolve()
    return reuse


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


def add_study_arguments(parser: argparse.ArgumentParser, several_steps: bool = False) -> None:
    """The options every study driver shares: model, corpora, calibration, Hydra overrides, lock, dry run."""
    parser.add_argument("--corpora", nargs="+", default=DEFAULT_CORPORA, choices=list(CORPORA))
    parser.add_argument("--model", default="smollm2-135m")
    if several_steps:
        parser.add_argument("--steps", type=int, nargs="+", default=None,
                            help="training steps (default: the recipe's); several values train every row at each length, "
                                 "cells keyed ROW@STEPS and paired with the control of the same length")
    else:
        parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's)")
    parser.add_argument("--calib-windows", type=int, default=None, help="GPTQ calibration windows (default: conf/calibration/default.yaml's 128)")
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--ood-chars", type=int, default=250_000, help="characters of the Python manual to score")
    parser.add_argument("--ood-text", default=None, help="your own out-of-domain .txt/.jsonl instead of the Python manual")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override given to every train.py and eval.py call (repeatable)")
    parser.add_argument("--train-set", dest="train_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for train.py calls only (repeatable)")
    parser.add_argument("--eval-set", dest="eval_overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Hydra override for eval.py calls only (repeatable), e.g. calibration.length=256")
    parser.add_argument("--lock", default=None, help="hold this flock file around each train/eval subprocess")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def main(argv: list[str] | None = None) -> int:
    return study_main(build_parser(), study, argv)


def study_main(parser: argparse.ArgumentParser, study: Any, argv: list[str] | None) -> int:
    """Parse ``argv`` and run ``study(args, argv)``; a :class:`StudyError` becomes one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return study(args, argv if argv is not None else sys.argv[1:])
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def study(args: argparse.Namespace, argv: list[str]) -> int:
    from npft_lightning.core.env import default_cache_dir

    root = lambda p: Path(p) if Path(p).is_absolute() else ROOT / p  # noqa: E731
    study_dir = root(args.study_dir).resolve()
    cache = default_cache_dir()
    reuse = parse_reuse(args.reuse)
    common = [f"model={args.model}", f"data.eval_seq_len={args.eval_seq_len}", *args.overrides]
    train_rows = [r for r in args.rows if ROWS[r] is not None]

    corpora, split_of_corpus, splits, corpus_overrides = corpus_setup(args, cache, common)

    eval_common = [*common, f"quant=[{','.join(args.quantizers)}]", f"splits=[{','.join(splits)}]", *args.eval_overrides,
                   *corpus_overrides]
    if args.max_eval_windows is not None:
        eval_common.append(f"data.max_eval_windows={args.max_eval_windows}")
    if args.calib_windows is not None:
        eval_common.append(f"calibration.windows={args.calib_windows}")

    # Plan: the pretrained evals first, then seed by seed so a partial study has whole seeds.
    plan: list[dict[str, Any]] = []
    if "pretrained" in args.rows:
        plan.append({"row": "pretrained", "seed": None, "kind": "eval", "dir": study_dir / "pretrained" / "eval",
                     "command": [sys.executable, "eval.py", *eval_common]})
    lengths: list[int | None] = list(args.steps) if args.steps else [None]
    for seed in args.seeds:
        for steps in lengths:
            for row in train_rows:
                key = row if len(lengths) == 1 else f"{row}@{steps}"
                train_overrides = [*common, *STUDY_BASE, *ROWS[row], *args.train_overrides, f"seed={seed}",
                                   *([f"trainer.max_steps={steps}"] if steps else [])]
                run_dir = reuse.get((row, seed), study_dir / key / f"seed{seed}" / "train")
                plan.append({"row": key, "seed": seed, "kind": "train", "dir": run_dir, "overrides": train_overrides,
                             "reuse": f"{row}:{seed}={run_dir}" if (row, seed) in reuse else None,
                             "command": [sys.executable, "train.py", *train_overrides, *TRAIN_FIXED, f"hydra.run.dir={run_dir}"]})
                plan.append({"row": key, "seed": seed, "kind": "eval", "dir": study_dir / key / f"seed{seed}" / "eval", "after": run_dir,
                             "command": [sys.executable, "eval.py", *eval_common, f"adapter={run_dir / 'adapter'}"]})

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
    if args.merge:
        others = [load_merged_study(root(p), settings, list(corpora)) for p in args.merge]
        cells, timing = merge_studies(keyed_by_steps(cells, args.steps), keyed_by_steps(timing, args.steps), others)
        rows += [r for other in others for r in other["settings"].get("rows", []) if r not in rows]
        # provenance: every command whose cells are in the tables, through merges of merges (a study seed by seed)
        settings["merged"] = [entry for p, other in zip(args.merge, others)
                              for entry in [*other["settings"].get("merged", []), {"json": str(p), "command": other.get("command", "")}]]
        # the settings describe the merged tables: every row, seed and length in them
        settings["rows"] = rows
        settings["seeds"] = sorted({int(seed) for seeds in cells.values() for seed in seeds if seed != "-"} | set(args.seeds))
        settings["steps"] = sorted({n for k in cells if (n := steps_of(k))} | set(args.steps or [])) or None
    print(f"cells: {ran} run, {skipped} reused from earlier runs, {len(failures)} failed")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    reduced = (args.rows != list(ROWS) or args.seeds != [0, 1, 2] or args.quantizers != QUANTIZERS or args.max_eval_windows is not None
               or args.calib_windows is not None or args.steps is not None or args.corpora != DEFAULT_CORPORA)
    result = {
        "bench": "quality", "date": date.today().isoformat(), "machine": machine(),
        "command": "python bench/quality.py " + shlex.join(argv),
        "settings": {**settings, "reduced": reduced},
        "corpora": corpora, "eval_split_of_corpus": split_of_corpus,
        "cells": cells,
        "aggregate": aggregate({k: cells[k] for k in sorted(cells, key=lambda k: (steps_of(k) or 0, rows.index(base_row(k))))
                                if base_row(k) in rows}, args.quantizers),
        "timing": timing,
        "failures": failures,
    }
    write_json(root(args.out_json), result)
    plot = root(args.plot)
    for draw, target in ((plot_quality, plot), (plot_gap_vs_steps, root(args.steps_plot or plot.with_name(plot.stem + "_steps.png"))),
                         (plot_frontier, root(args.frontier_plot or plot.with_name(plot.stem + "_frontier.png")))):
        if draw(result, target):
            print(f"wrote {target}")
    write_results_block(root(args.results_md), render_markdown(result))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
