"""Human-readable results: the before/after table of one run, and the report over a Hydra sweep.

    python -m npft_lightning report logs/npft_smollm2/multiruns/<date>_<time>    # report.md, report.csv, ppl_vs_<key>.png

The sweep report reads every job's ``.hydra/overrides.yaml`` and ``metrics.json``; the swept keys
are the overrides whose value differs between jobs. The control (``noise=none`` or ``noise.scale=0``)
is marked in the table and drawn as a dashed line, the pretrained model ("before") as a dotted one.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import OverrideParseException
from rich.console import Console
from rich.table import Table

from npft_lightning.core.errors import UserError
from npft_lightning.core.io import atomic_write_text
from npft_lightning.tasks.figures import panel_grid, save_figure


def ppl_rows(metrics: dict[str, Any]) -> list[tuple[str, float | None, float | None]]:
    """(quantizer, PPL before, PPL after) with the unquantized model first."""
    before = metrics.get("ppl", {}).get("before", {})
    after = metrics.get("ppl", {}).get("after", {})
    names = ["fp"] + [n for n in dict.fromkeys([*before, *after]) if n != "fp"]
    return [(n, before.get(n), after.get(n)) for n in names]


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def print_summary(metrics: dict[str, Any], output_dir: str | Path | None = None, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="Validation perplexity, before and after fine-tuning")
    table.add_column("weights")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_column("change", justify="right")
    for name, before, after in ppl_rows(metrics):
        change = "—" if before is None or after is None else f"{100 * (after - before) / before:+.2f} %"
        table.add_row("unquantized" if name == "fp" else name, _fmt(before), _fmt(after), change)
    console.print(table)
    curvature = metrics.get("curvature") or {}
    if curvature:
        parts = [f"{stage} {res['curvature_outliers']:.4g}" for stage, res in curvature.items()]
        console.print("Curvature on the outliers, Tr(H_MM) by perturbation: " + ", ".join(parts))
    if output_dir is not None:
        console.print(f"Results: {Path(output_dir) / 'metrics.json'}")


# ------------------------------------------------------------------------------------------ sweeps
@dataclass
class Job:
    """One job of a Hydra multirun: its folder, its command-line overrides and (when it finished) its metrics."""

    path: Path
    overrides: dict[str, Any]  # key -> value as Hydra types it, see parse_overrides
    metrics: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def control(self) -> bool:
        """The no-noise control: ``noise=none`` (NoNoise) or a zero noise scale."""
        noise = ((self.metrics or {}).get("config") or {}).get("noise") or {}
        target = str((noise.get("distribution") or {}).get("_target_", ""))
        return target.endswith("NoNoise") or noise.get("scale") == 0

    def ppl(self, stage: str, quantizer: str) -> float | None:
        return ((self.metrics or {}).get("ppl") or {}).get(stage, {}).get(quantizer)

    def curvature(self, stage: str) -> float | None:
        return (((self.metrics or {}).get("curvature") or {}).get(stage) or {}).get("curvature_outliers")


def parse_overrides(lines: list[str]) -> dict[str, Any]:
    """Hydra's overrides as Hydra's parser reads them: ``["+noise.scale=0.5", "quant=[rtn4,rtn3_g32]"]`` ->
    ``{"noise.scale": 0.5, "quant": "[rtn4,rtn3_g32]"}`` (numbers typed; lists, dicts and sweeps kept as their text,
    one hashable table cell)."""
    parsed = {}
    for override in OverridesParser.create().parse_overrides(lines):
        key = f"{override.key_or_group}@{override.package}" if override.package else override.key_or_group
        value = override.value()
        parsed[key] = value if value is None or isinstance(value, (str, int, float)) else override.get_value_element_as_str()
    return parsed


def _job_order(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, str(path))


def _read(path: Path, parse, what: str) -> Any:
    """``parse`` of the text of ``path``; one line naming the file when it cannot be read or parsed."""
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise UserError(f"{path} cannot be read as {what} ({err.__class__.__name__}); rerun that job, or move its folder "
                        f"out of the sweep to report the others") from err


def load_sweep(root: str | Path) -> list[Job]:
    """Every job under ``root`` (a multirun folder, or a single run folder), in job-number order."""
    root = Path(root)
    jobs = []
    for overrides_file in root.rglob(".hydra/overrides.yaml"):
        path = overrides_file.parent.parent
        listed = _read(overrides_file, yaml.safe_load, "Hydra's overrides (YAML)") or []
        if not isinstance(listed, list):
            raise UserError(f"{overrides_file} is not a list of overrides; rerun that job, or move its folder out of the sweep")
        try:
            overrides = parse_overrides([str(o) for o in listed])
        except OverrideParseException as err:
            first = str(err).splitlines()[0]
            raise UserError(f"{overrides_file} holds an override Hydra cannot parse ({first}); rerun that job, or move its "
                            "folder out of the sweep") from err
        metrics_file = path / "metrics.json"
        metrics = _read(metrics_file, json.loads, "JSON") if metrics_file.is_file() else None
        jobs.append(Job(path, overrides, metrics))
    return sorted(jobs, key=lambda job: _job_order(job.path))


def swept_keys(jobs: list[Job]) -> list[str]:
    """The override keys whose value is not the same in every job, in command-line order."""
    keys = list(dict.fromkeys(k for job in jobs for k in job.overrides))
    return [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]


def quantizer_names(jobs: list[Job]) -> list[str]:
    """``fp`` (unquantized) first, then every quantizer any job measured, in first-seen order."""
    names = [n for job in jobs for stage in ("before", "after") for n in ((job.metrics or {}).get("ppl") or {}).get(stage, {})]
    return ["fp"] + [n for n in dict.fromkeys(names) if n != "fp"]


def _label(name: str) -> str:
    return "unquantized" if name == "fp" else name


def sweep_table(jobs: list[Job], keys: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and rows: job, swept values, control flag, PPL after and before per quantizer, curvature."""
    names = quantizer_names(jobs)
    header = ["job", *keys, "control"]
    header += [f"ppl_after/{n}" for n in names] + [f"ppl_before/{n}" for n in names]
    curvature = any(job.curvature("after") is not None for job in jobs)
    if curvature:
        header += ["curvature_before", "curvature_after"]
    rows = []
    for job in jobs:
        row: list[Any] = [job.name, *(job.overrides.get(k) for k in keys), job.control if job.metrics else None]
        row += [job.ppl("after", n) for n in names] + [job.ppl("before", n) for n in names]
        if curvature:
            row += [job.curvature("before"), job.curvature("after")]
        rows.append(row)
    return header, rows


def _md_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "**control**" if value else ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e4 or (value and abs(value) < 1e-2) else f"{value:.3f}"
    return str(value)


def markdown_report(root: Path, jobs: list[Job], keys: list[str]) -> str:
    header, rows = sweep_table(jobs, keys)
    pretty = [re.sub(r"^ppl_(after|before)/(.+)$", lambda m: f"{_label(m[2])} {m[1]}", h).replace("curvature_", "Tr(H) ")
              for h in header]
    done = sum(job.metrics is not None for job in jobs)
    lines = [f"# NPFT sweep: {root}", "",
             f"{len(jobs)} jobs ({done} finished), swept: {', '.join(keys) or 'nothing'}. "
             "Validation perplexity after fine-tuning per quantizer, and before it (the pretrained model).", "",
             "| " + " | ".join(pretty) + " |", "|" + "|".join("---" if i < len(keys) + 2 else "---:" for i in range(len(header))) + "|"]
    # Swept values as Hydra reads them (0.10 -> 0.1, 2e-4 -> 0.0002); PPLs with 3 decimals.
    lines += ["| " + " | ".join(str(v) if i <= len(keys) and v is not None else _md_cell(v) for i, v in enumerate(row)) + " |"
              for row in rows]
    missing = [job.name for job in jobs if job.metrics is None]
    if missing:
        lines += ["", f"No metrics.json (unfinished or failed): jobs {', '.join(missing)}."]
    return "\n".join(lines) + "\n"


def csv_report(jobs: list[Job], keys: list[str]) -> str:
    header, rows = sweep_table(jobs, keys)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    return buffer.getvalue()


def plot_sweep(jobs: list[Job], key: str, keys: list[str], path: Path) -> Path:
    """PPL after fine-tuning against ``key``, one panel and line per quantizer (per value of the other swept keys).

    Dashed: the control's PPL (highlighted with a star where it is a point of the line); dotted:
    the pretrained model's PPL.
    """
    finished = [job for job in jobs if job.metrics is not None]
    names = quantizer_names(finished)
    others = [k for k in keys if k != key]
    values = list(dict.fromkeys(job.overrides.get(key) for job in finished))
    numeric = all(isinstance(v, (int, float)) for v in values)
    position = (lambda v: v) if numeric else {v: i for i, v in enumerate(values)}.get
    control = next((job for job in finished if job.control), None)

    fig, panels = panel_grid(len(names), 4.2, 3.4)
    for ax, name in zip(panels, names):
        groups: dict[tuple, list[Job]] = {}
        for job in finished:
            groups.setdefault(tuple(job.overrides.get(k) for k in others), []).append(job)
        for group, members in groups.items():
            points = sorted(((position(job.overrides.get(key)), job) for job in members if job.ppl("after", name) is not None),
                            key=lambda p: p[0])
            if not points:
                continue
            label = ", ".join(f"{k}={v}" for k, v in zip(others, group)) or "after fine-tuning"
            line, = ax.plot([x for x, _ in points], [job.ppl("after", name) for _, job in points], marker="o", label=label)
            for x, job in points:
                if job.control:
                    ax.plot([x], [job.ppl("after", name)], marker="*", markersize=14, color=line.get_color(), zorder=3)
        if control is not None and control.ppl("after", name) is not None:
            ax.axhline(control.ppl("after", name), color="gray", linestyle="--", linewidth=1, label="control (no noise)")
        before = next((job.ppl("before", name) for job in finished if job.ppl("before", name) is not None), None)
        if before is not None:
            ax.axhline(before, color="black", linestyle=":", linewidth=1, label="before (pretrained)")
        ax.set_title(_label(name))
        ax.set_xlabel(key)
        ax.set_ylabel("validation PPL")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    fig.suptitle(f"Perplexity after NPFT fine-tuning vs {key}")
    return save_figure(fig, path)


def write_sweep_report(root: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """``report.md``, ``report.csv`` and one ``ppl_vs_<key>.png`` per swept key, in ``out_dir`` (default ``root``)."""
    root = Path(root)
    jobs = load_sweep(root)
    if not jobs:
        raise UserError(f"sweep_dir={root} holds no Hydra job (no .hydra/overrides.yaml below it); give the folder of a "
                        "train.py -m sweep (logs/<task>/multiruns/<date>_<time>) or of one run")
    keys = swept_keys(jobs)
    out = Path(out_dir) if out_dir is not None else root
    files = {"md": out / "report.md", "csv": out / "report.csv"}
    atomic_write_text(files["md"], markdown_report(root, jobs, keys))
    atomic_write_text(files["csv"], csv_report(jobs, keys))
    if any(job.metrics for job in jobs):
        for key in keys:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            files[f"plot:{key}"] = plot_sweep(jobs, key, keys, out / f"ppl_vs_{safe}.png")
    return files


def check_args(sweep_dir: str, out: str | None) -> None:
    """The command line, before any job is read: the sweep folder exists, the report's folder is writable."""
    from npft_lightning.core.fs import check_writable_dir

    root = Path(sweep_dir).expanduser()
    if not root.is_dir():
        problem = "is a file, not a folder" if root.exists() else "does not exist"
        raise UserError(f"sweep_dir={sweep_dir} {problem}; give the folder of a train.py -m sweep "
                        "(logs/<task>/multiruns/<date>_<time>) or of one run")
    key, folder = ("--out", out) if out is not None else ("sweep_dir", sweep_dir)
    check_writable_dir(key, folder, "pass --out <a writable folder> for report.md, report.csv and the plots", create=False)


def main(argv: list[str] | None = None) -> None:
    from npft_lightning.tasks.one_line_errors import ArgumentParser, one_line_errors

    parser = ArgumentParser(prog="python -m npft_lightning report",
                            description="Aggregate a Hydra multirun of train.py into a table and plots.")
    parser.add_argument("sweep_dir", help="the multirun folder (logs/<task>/multiruns/<date>_<time>) or one run folder")
    parser.add_argument("--out", default=None, help="where to write report.md/.csv and the plots (default: sweep_dir)")
    args = parser.parse_args(argv)
    with one_line_errors():
        check_args(args.sweep_dir, args.out)
        files = write_sweep_report(args.sweep_dir, args.out)
    print(files["md"].read_text())
    for path in files.values():
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
