"""The study framework of bench/quality.py and bench/requant.py: a plan of train.py / eval.py cells run as
subprocesses into a resumable study folder, optionally under a lock shared with other heavy jobs, and the
merging of an earlier study's cells into this one's tables.

A plan is a list of steps, each a dict with ``kind`` ("train" or "eval"), ``dir`` (its run folder), ``command``
and ``row``; a train step also carries its Hydra ``overrides`` (to check a finished run against), ``reuse``
(the --reuse argument it came from, or None) and optionally ``trained_elsewhere`` (another job trains that
folder: wait for it, never train it here); an eval step may name the train folder it needs in ``after`` and
the files to delete once its metrics are in (``discard``: glob patterns in its folder).
A finished cell is never run again: a train step whose folder holds a run of the same training config, an
eval step whose metrics exist for the same command. An interrupted train step goes on from its last checkpoint
(train.py saves one every 50 steps) when the study runs again with the same command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import ROOT, StudyError, load_config
from filelock import FileLock
from quality_rows import keyed_by_steps
from study_corpora import CORPORA, DEFAULT_CORPORA
from tqdm.auto import tqdm

# Training is done once per row and seed; validation during training is redundant with eval.py (one window
# keeps the before/after table cheap).
TRAIN_FIXED = ["quant=none", "curvature=null", "data.max_eval_windows=1"]
# The parts of a training config that determine the adapter (what a reused run must match).
TRAIN_KEYS = ("seed", "model", "data", "peft", "outliers", "noise", "optimizer", "schedule", "trainer", "gradient_checkpointing",
              "imatrix")
IGNORED_KEYS = {"cache_dir", "default_root_dir", "max_eval_windows", "eval_batch_size", "enable_progress_bar", "progress"}
# What two studies must share for their cells to stand in one table (rows and seeds may differ).
MERGE_SETTINGS = ("model", "max_eval_windows", "calib_windows", "eval_seq_len", "overrides", "train_overrides", "eval_overrides")


def study_path(path: str | Path) -> Path:
    """A path given on a study's command line: relative ones are relative to the checkout."""
    return Path(path) if Path(path).is_absolute() else ROOT / path


# --------------------------------------------------------------------------------------------
# Finished cells
# --------------------------------------------------------------------------------------------


def validation_overrides(overrides: list[str]) -> list[str]:
    """``TRAIN_FIXED`` for a training with ``overrides``, less ``quant=none`` where the recipe's noise targets a
    quantizer of its quant group (``${quant.q4_0}``): that run keeps the recipe's quant (one validation window)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            OmegaConf.to_container(load_config([*overrides, *TRAIN_FIXED], tmp).noise, resolve=True)
        except InterpolationResolutionError:
            return [o for o in TRAIN_FIXED if o != "quant=none"]
    return TRAIN_FIXED


def strip_ignored(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: strip_ignored(v) for k, v in tree.items() if k not in IGNORED_KEYS}
    if isinstance(tree, list):
        return [strip_ignored(v) for v in tree]
    return tree


NO_NOISE = "npft_lightning.npft.noise.NoNoise"


def train_signature(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a resolved training config that determines the trained adapter.

    A run without noise (a control) trains the same whatever its noise schedule options and outlier score say: the
    perturbed steps are drawn from their own stream, and outliers are selected only for the noise or for the
    curvature probe, which like the rest of validation is left out. Its signature keeps the noise distribution alone
    and no outliers, so the control of one study (``experiment=npft_fisher noise=none``) is the control of another
    (``experiment=npft_smollm2 noise=none``).
    """
    signature = {k: config.get(k) for k in TRAIN_KEYS}
    noise = signature.get("noise") or {}
    if (noise.get("distribution") or {}).get("_target_") == NO_NOISE:
        signature["noise"], signature["outliers"] = {"distribution": noise["distribution"]}, None
    return strip_ignored(signature)


# Options added to the training config after runs were trained, with the value that trains exactly as before
# they existed. A run's config without such a key matches a config that has it at this value (the runs of a long
# study stay usable across the change); any other value is a difference. tests/test_bench.py checks that each
# value is the default of every recipe that leaves it unset.
NEUTRAL_ADDED_OPTIONS: dict[str, Any] = {
    "noise.distill": {"teacher": None, "temperature": 1.0, "weight": 1.0},  # no distillation (2026-12-05)
    "noise.distribution.quantizers": None,  # one target grid (2026-12-05)
    "noise.placement": "random",  # perturbed steps anywhere in the run (2026-12-05)
    "noise.last_fraction": 1.0,
    "noise.step_probability_ramp": "constant",
    "imatrix": None,  # no importance matrix (2026-12-05)
}


def config_difference(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> str | None:
    """The first dotted key where two nested dicts differ, with both values; None when equal. A key ``a`` (the
    trained run's config) lacks counts as equal when ``b`` holds it at its :data:`NEUTRAL_ADDED_OPTIONS` value. Keys
    both hold come first (a control's noise against a recipe's differs at its distribution, not at an option the
    control's signature leaves out)."""
    for key in sorted(set(a) & set(b)) + sorted(set(a) ^ set(b)):
        va, vb = a.get(key), b.get(key)
        dotted = f"{prefix}{key}"
        if key not in a and dotted in NEUTRAL_ADDED_OPTIONS and vb == NEUTRAL_ADDED_OPTIONS[dotted]:
            continue
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


# What the driver records in a train step's folder before it launches train.py there: the command, so that a later
# run of the study can tell an interrupted training of this very command (resume it) from another one's leftovers.
TRAIN_COMMAND = "driver_command.json"


def recorded_command_is(record: Path, command: list[str]) -> bool:
    """Whether ``record`` (the JSON a driver wrote for a cell) holds ``command``; [0], the interpreter, may differ."""
    try:
        return json.loads(record.read_text())[1:] == command[1:]
    except (OSError, ValueError):
        return False


def finished_eval(cell: Path, command: list[str]) -> dict[str, Any] | None:
    """The metrics of an eval cell that already ran this exact command, else None."""
    if not recorded_command_is(cell / "command.json", command):
        return None
    try:
        return json.loads((cell / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------
# Running cells
# --------------------------------------------------------------------------------------------


def parse_reuse(values: list[str], rows: list[str]) -> dict[tuple[str, int], Path]:
    """--reuse ROW:SEED=RUN_DIR arguments as (row, seed) -> run folder; ``rows``: the trained rows."""
    reuse = {}
    for value in values:
        match = re.fullmatch(r"([\w.]+):(\d+)=(.+)", value)
        if not match or match.group(1) not in rows:
            raise StudyError(f"--reuse {value!r}: write ROW:SEED=RUN_DIR with ROW one of {', '.join(rows)}")
        reuse[(match.group(1), int(match.group(2)))] = Path(match.group(3)).expanduser().resolve()
    return reuse


def held(lock: str | None) -> contextlib.AbstractContextManager:
    """An exclusive lock on the file ``lock`` (an flock on Unix: shared with other heavy jobs that flock it), or nothing."""
    return FileLock(lock) if lock else contextlib.nullcontext()


def run_cell(command: list[str], log: Path, lock: str | None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "HYDRA_FULL_ERROR": "1"}
    with held(lock), open(log, "a") as out:  # a resumed or rerun cell keeps the log of its earlier runs
        out.write(("\n" if out.tell() else "") + "$ " + shlex.join(command) + "\n")  # a killed run may end mid-line
        out.flush()
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"exit code {code}: {shlex.join(command)}\n  " + "\n  ".join(tail))


def trained_row(row: str, seed: int, overrides: list[str], run_dir: Path, reuse: str | None, eval_dir: Path,
                eval_args: list[str], **fields: Any) -> list[dict[str, Any]]:
    """The two steps of a trained row: train.py with ``overrides`` into ``run_dir`` (a --reuse run when ``reuse``),
    then eval.py with ``eval_args`` on its adapter into ``eval_dir``; ``fields`` go into both steps."""
    train = {"row": row, "seed": seed, **fields, "kind": "train", "dir": run_dir, "overrides": overrides, "reuse": reuse,
             "command": [sys.executable, "train.py", *overrides, *validation_overrides(overrides), f"hydra.run.dir={run_dir}"]}
    evaluate = {"row": row, "seed": seed, **fields, "kind": "eval", "dir": eval_dir, "after": run_dir,
                "command": [sys.executable, "eval.py", *eval_args, f"adapter={run_dir / 'adapter'}"]}
    return [train, evaluate]


def run_plan(plan: list[dict[str, Any]], lock: str | None, dry_run: bool, desc: str,
             finished_only: bool = False) -> tuple[list[tuple[dict[str, Any], dict[str, Any]]], int, int, list[str]]:
    """Run a study's cells in order and return (eval step, its metrics) of every finished eval, the number of
    cells run and reused, and the failures.

    A ``train`` step is skipped when its folder holds a finished run of the same config; its ``reuse`` (the
    --reuse argument it came from) makes an unusable run stop the study; ``trained_elsewhere`` makes a run
    without metrics.json yet (another job is training it) a wait: its evals are left out this time. An ``eval``
    step is skipped when its metrics exist for the same command, and left out when the training in its
    ``after`` folder failed or is awaited; once it has run, the files of its ``discard`` patterns are deleted.
    ``dry_run`` prints the commands still to run instead; ``finished_only`` runs nothing and returns the
    evals that have finished (to write the tables of a study that is still running).
    """
    from npft_lightning.core.io import atomic_write_json

    evals, failures, ran, skipped = [], [], 0, 0
    failed_train: set[Path] = set()
    for step in tqdm(plan, desc=desc, disable=dry_run):
        if step["kind"] == "train":
            done, why = finished_train(step["dir"], expected_train_signature(step["overrides"]))
            if not done and step.get("trained_elsewhere") and not (step["dir"] / "metrics.json").is_file():
                tqdm.write(f"waiting for {step['dir']} (trained by another job, no metrics.json yet): its evals are left out")
                failed_train.add(step["dir"])
                continue
            if step.get("reuse") and not done:
                raise StudyError(f"--reuse {step['reuse']} cannot be used: {why}")
            if done:
                skipped += 1
            elif finished_only:
                failed_train.add(step["dir"])  # not trained yet: its eval is left out
            else:
                command = train_command(step, dry_run)
                if dry_run:
                    print(shlex.join(command))
                    continue
                try:
                    run_cell(command, step["dir"] / "driver.log", lock)
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
                for pattern in step.get("discard", ()):
                    for path in step["dir"].glob(pattern):
                        path.unlink()
            except RuntimeError as err:
                failures.append(str(err))
                continue
        else:
            skipped += 1
        evals.append((step, metrics))
    return evals, ran, skipped, failures


def train_command(step: dict[str, Any], dry_run: bool) -> list[str]:
    """The train.py command of a train step not finished yet: its command, resuming from the last checkpoint when an
    earlier run of the study launched the same command there and was interrupted (a resume gives the uninterrupted
    adapter, tests/test_resume.py). A fresh start records its command and removes another command's last checkpoint
    (train.py would overwrite it at its first checkpoint anyway), so that an interruption before then never resumes
    from it."""
    from npft_lightning.core.io import atomic_write_json

    run_dir, command = step["dir"], step["command"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file() and recorded_command_is(run_dir / TRAIN_COMMAND, command):
        if not dry_run:
            tqdm.write(f"resuming the interrupted training in {run_dir} from {last}")
        return [*command, f"ckpt_path={last}"]
    if not dry_run:
        if last.is_file():
            tqdm.write(f"training {run_dir} afresh: its {last} is not of this command (removed)")
            last.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / TRAIN_COMMAND, command)
    return command


def print_outcome(ran: int, skipped: int, failures: list[str]) -> None:
    print(f"cells: {ran} run, {skipped} reused from earlier runs, {len(failures)} failed")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Merging an earlier study
# --------------------------------------------------------------------------------------------


def load_merged_study(path: Path, settings: dict[str, Any], corpora: list[str]) -> dict[str, Any]:
    """An earlier study's --out-json, checked to be measured like this one (``MERGE_SETTINGS``, corpora, quantizers)."""
    other = read_study_json(path, "quality")
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


def read_study_json(path: Path, bench: str) -> dict[str, Any]:
    """The --out-json of an earlier run of ``bench/<bench>.py``, for --merge: one line when it is not one."""
    try:
        other = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise StudyError(f"--merge {path}: cannot read it ({err}); give the --out-json of an earlier bench/{bench}.py run") from None
    if not isinstance(other, dict) or other.get("bench") != bench or not isinstance(other.get("cells"), dict):
        raise StudyError(f"--merge {path}: not a JSON of bench/{bench}.py (no bench={bench} with cells); give an earlier --out-json")
    return other


def merge_studies(cells: dict[str, Any], timing: dict[str, Any], others: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """This study's cells and step clocks plus those of ``others`` for the (row, seed) pairs this study lacks:
    a cell measured here wins over an earlier copy of it."""
    for other in others:
        steps = other.get("settings", {}).get("steps")
        cells = merge_cells(cells, keyed_by_steps(other["cells"], steps))
        timing = merge_cells(timing, keyed_by_steps(other.get("timing", {}), steps))
    return cells, timing


def merge_provenance(paths: list[str], others: list[dict[str, Any]], command: str | None = None) -> list[dict[str, str]]:
    """Every command whose cells a merged table holds, through merges of merges: each earlier result's own list, then
    that result's JSON and command. Each command once, and not ``command`` (the one writing this table): a study
    merged into itself seed after seed (``--merge X --out-json X``) would otherwise list the same command again at
    every run."""
    seen, chain = {command}, []
    for path, other in zip(paths, others):
        earlier = other.get("settings", other).get("merged") or []  # gptq_llamacpp keeps its list at the top level
        for entry in [*earlier, {"json": str(path), "command": other.get("command", "")}]:
            if entry["command"] not in seen:
                seen.add(entry["command"])
                chain.append(entry)
    return chain


def merge_cells(mine: dict[str, dict[str, Any]], theirs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``mine`` (row -> seed -> value) plus the (row, seed) entries of ``theirs`` that it lacks: a cell measured here
    wins over an earlier copy of it."""
    merged = {k: dict(v) for k, v in mine.items()}
    for key, seeds in theirs.items():
        for seed, value in seeds.items():
            merged.setdefault(key, {}).setdefault(seed, value)
    return merged


# --------------------------------------------------------------------------------------------
# Command line and output
# --------------------------------------------------------------------------------------------


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
    parser.add_argument("--lock", default=None, help="hold this lock file (flock) around each train/eval subprocess")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def study_main(parser: argparse.ArgumentParser, study: Any, argv: list[str] | None) -> int:
    """Parse ``argv`` and run ``study(args, argv)``; a :class:`StudyError` becomes one line and exit code 2."""
    args = parser.parse_args(argv)
    try:
        return study(args, argv if argv is not None else sys.argv[1:])
    except StudyError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def write_results_block(path: Path, block: str, begin: str, end: str) -> None:
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
