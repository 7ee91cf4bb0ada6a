"""Human-readable results: the before/after table printed at the end of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


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
