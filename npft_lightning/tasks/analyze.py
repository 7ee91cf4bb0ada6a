"""Robustness analysis behind ``analyze.py``: perplexity under artificial perturbations, and under quantization.

For each model variant (the pretrained model, and trained adapters merged in: ``adapters={name: path}``)
and each perturbation kind of ``cfg.perturb`` (:class:`~npft_lightning.npft.perturb.Perturbation`), the
validation perplexity at every magnitude of the kind, next to the variant's unperturbed perplexity;
then, optionally, the fake-quantized perplexity of each quantizer of ``cfg.quant`` (W8A8, W4A8, ...).
No training. Results go to the run dir: ``perturbation.csv`` / ``quantization.csv`` (one row per
point), ``analysis.json`` (everything plus the config), ``perturbation.png`` (PPL vs magnitude, one
panel per kind, one line per variant), with several variants ``perturbation_vs_<first>.png`` (each
variant's PPL over the first one's at the same point), and ``report.md``; the files are rewritten atomically after
every point, so an interrupted run keeps what it measured.

Each point is seeded by (seed, kind name, magnitude index): every variant sees the same unit-noise
draws for the same point (common random numbers, so variants differ by the model, not the draw).
"""

from __future__ import annotations

import csv
import io
import time
import zlib
from functools import partial
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from npft_lightning.core import interrupt
from npft_lightning.core.io import atomic_write_json, atomic_write_text
from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.lm.adapters import check_adapter_fits
from npft_lightning.npft.noise import noise_generator
from npft_lightning.npft.perturb import (
    Perturbation,
    perturbed_activations,
    perturbed_weights,
)
from npft_lightning.quant.calibration import Calibration
from npft_lightning.quant.scoring import score_quantized
from npft_lightning.tasks.build import build_quantizers, calibration_spec
from npft_lightning.tasks.checks import window_lengths
from npft_lightning.tasks.checks_eval import (
    adapter_key,
    build_perturbations,
    variants_of,
)
from npft_lightning.tasks.evaluate import load_for_eval
from npft_lightning.tasks.figures import panel_grid, save_figure

PERTURBATION_FIELDS = ("variant", "perturbation", "target", "distribution", "relative", "sign_preserving", "mask", "ratio",
                       "group_size", "magnitude", "ppl", "ppl_unperturbed", "perturbed", "seconds")
QUANT_FIELDS = ("variant", "quantizer", "ppl", "ppl_unquantized", "seconds")


def point_generator(seed: int, kind: str, index: int, device: torch.device) -> torch.Generator:
    """The seeded generator of one sweep point: CPU for weights (device-independent draws), the
    activations' device for activation noise (drawn inside the forward pass)."""
    cpu = noise_generator(seed, zlib.crc32(kind.encode()), index)
    if device.type == "cpu":
        return cpu
    return torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=cpu)))


class Analysis:
    """Runs the sweep of one config; holds the rows measured so far and writes them after every point."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out_dir = Path(cfg.paths.output_dir)
        self.device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.perturbations = build_perturbations(cfg)
        self.variants = variants_of(cfg)  # options checked by config_eval.validate_scoring_config
        self.lengths = window_lengths(build_quantizers(cfg).values(), outliers=any(p.mask == "outliers" for p in self.perturbations))
        self.rows: list[dict[str, Any]] = []
        self.quant_rows: list[dict[str, Any]] = []
        self.baselines: dict[str, float] = {}
        self.outlier_counts: dict[str, int] = {}
        self._pretrained_masks: dict[str, torch.Tensor] | None = None

    # ---------------------------------------------------------------------------------- measuring
    def run(self) -> dict[str, Any]:
        points = sum(len(p.magnitudes) for p in self.perturbations) + len(self.cfg.get("quant") or {}) + 1
        datamodule = None
        with tqdm(total=points * len(self.variants), desc="analysis", unit="point") as bar:
            for variant, adapter in self.variants.items():
                model, tokenizer = load_for_eval(OmegaConf.merge(self.cfg, {"adapter": adapter}), self.lengths,
                                                 adapter_key(self.cfg, variant))
                if datamodule is None:  # the first model: every later variant's adapter must fit it too, before any scoring
                    for other, folder in self.variants.items():
                        if folder:
                            check_adapter_fits(adapter_key(self.cfg, other), folder, model, self.cfg.model.name)
                    datamodule = instantiate(self.cfg.data, tokenizer=tokenizer)
                    datamodule.setup("validate")
                model.to(self.device)
                windows = datamodule.eval_windows(self.cfg.split)
                linears = decoder_linears(model)
                self.baselines[variant] = self._ppl(model, windows, f"{variant} unperturbed")
                bar.update(1)
                masks = self._outliers(variant, adapter, model, linears, datamodule)
                for perturbation in self.perturbations:
                    for index, magnitude in enumerate(perturbation.magnitudes):
                        bar.set_postfix_str(f"{variant} {perturbation.name} {magnitude:g}")
                        self._perturbation_point(variant, model, linears, windows, perturbation, index, magnitude, masks)
                        bar.update(1)
                quantizers = build_quantizers(self.cfg)  # fresh objects and calibration: the Fisher of this variant
                calibration = Calibration.drawn(datamodule, calibration_spec(self.cfg), quantizers.values(), self.device)
                for name, quantizer in quantizers.items():
                    bar.set_postfix_str(f"{variant} {name}")
                    start = time.perf_counter()
                    with torch.no_grad():
                        ppl = score_quantized(model, linears, quantizer, partial(self._ppl, model, windows, f"{variant} {name}"),
                                              calibration)
                    self.quant_rows.append({"variant": variant, "quantizer": name, "ppl": ppl,
                                            "ppl_unquantized": self.baselines[variant], "seconds": time.perf_counter() - start})
                    self.write()
                    bar.update(1)
                del model, linears, calibration
        self.write(plot=True)
        print_tables(self.rows, self.quant_rows, self.baselines)
        return self.results()

    def _ppl(self, model, windows: torch.Tensor, desc: str) -> float:
        batches = tqdm(windows.split(self.cfg.data.eval_batch_size), desc=desc, leave=False)
        return perplexity(*dataset_nll(model, batches, self.device))

    def _perturbation_point(self, variant, model, linears, windows, perturbation: Perturbation, index: int, magnitude: float, masks) -> None:
        start = time.perf_counter()
        generator = point_generator(self.cfg.seed, perturbation.name, index,
                                    torch.device("cpu") if perturbation.target == "weight" else self.device)
        touched = None
        if perturbation.target == "weight":
            with perturbed_weights(linears, perturbation, magnitude, generator, masks) as touched:
                ppl = self._ppl(model, windows, f"{variant} {perturbation.name} {magnitude:g}")
        else:
            with perturbed_activations(linears, perturbation, magnitude, generator):
                ppl = self._ppl(model, windows, f"{variant} {perturbation.name} {magnitude:g}")
        self.rows.append({
            "variant": variant, "perturbation": perturbation.name, "target": perturbation.target,
            "distribution": perturbation.distribution, "relative": perturbation.relative,
            "sign_preserving": perturbation.sign_preserving, "mask": perturbation.mask, "ratio": perturbation.ratio,
            "group_size": perturbation.group_size, "magnitude": magnitude, "ppl": ppl,
            "ppl_unperturbed": self.baselines[variant], "perturbed": touched, "seconds": time.perf_counter() - start,
        })
        self.write()

    def _outliers(self, variant, adapter, model, linears, datamodule) -> dict[str, torch.Tensor] | None:
        """The outlier masks for ``mask=outliers`` kinds: the pretrained model's (the weights NPFT perturbed
        while training, ``outliers_on=pretrained``) or each variant's own (``self``)."""
        if not any(p.mask == "outliers" for p in self.perturbations):
            return None
        if self.cfg.outliers_on == "pretrained" and self._pretrained_masks is not None:
            return self._pretrained_masks
        if self.cfg.outliers_on == "pretrained" and adapter is not None:
            base, _ = load_for_eval(OmegaConf.merge(self.cfg, {"adapter": None}), self.lengths)
            base.to(self.device)
            masks = self._select(base, decoder_linears(base), datamodule)
            del base
        else:
            masks = self._select(model, linears, datamodule)
        if self.cfg.outliers_on == "pretrained":
            self._pretrained_masks = masks
        self.outlier_counts[variant] = sum(int(m.numel()) for m in masks.values())  # numel(): the count, for every mask form
        return masks

    def _select(self, model, linears, datamodule) -> dict[str, torch.Tensor]:
        selector = instantiate(self.cfg.outliers)
        windows = None
        if selector.needs_calibration:
            windows = datamodule.calibration_windows(selector.calibration_windows, selector.calibration_length,
                                                     seed=selector.calibration_seed).to(self.device)
        with torch.enable_grad():
            return selector.select(model, linears, windows)

    # ---------------------------------------------------------------------------------- writing
    def results(self) -> dict[str, Any]:
        return {
            "unperturbed": self.baselines,
            "perturbation": self.rows,
            "quantization": self.quant_rows,
            "outliers": self.outlier_counts,
            "kinds": {p.name: {"description": p.describe(), **vars(p)} for p in self.perturbations},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def write(self, plot: bool = False) -> None:
        atomic_write_text(self.out_dir / "perturbation.csv", to_csv(self.rows, PERTURBATION_FIELDS))
        if self.quant_rows:
            atomic_write_text(self.out_dir / "quantization.csv", to_csv(self.quant_rows, QUANT_FIELDS))
        atomic_write_json(self.out_dir / "analysis.json", self.results())
        interrupt.set_outcome(f"; the points measured so far are in {self.out_dir} (analysis.json, perturbation.csv), "
                              f"run the same command again for all of them")
        atomic_write_text(self.out_dir / "report.md", markdown_report(self.rows, self.quant_rows, self.baselines,
                                                                    {p.name: p.describe() for p in self.perturbations}))
        if plot and self.rows:
            descriptions = {p.name: p.describe() for p in self.perturbations}
            plot_curves(self.rows, descriptions, self.out_dir / "perturbation.png")
            if len(self.baselines) > 1:
                reference = next(iter(self.baselines))
                plot_relative(self.rows, self.baselines, reference, descriptions, self.out_dir / f"perturbation_vs_{reference}.png")


def analyze(cfg: DictConfig) -> dict[str, Any]:
    return Analysis(cfg).run()


# ------------------------------------------------------------------------------------------ tables and plot
def to_csv(rows: list[dict[str, Any]], fields: tuple[str, ...]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: row.get(k) for k in fields})
    return buffer.getvalue()


def _variants(rows: list[dict[str, Any]], baselines: dict[str, float]) -> list[str]:
    return list(dict.fromkeys([*baselines, *(r["variant"] for r in rows)]))


def markdown_report(rows, quant_rows, baselines: dict[str, float], descriptions: dict[str, str]) -> str:
    """Two tables, a column per variant: PPL per (kind, magnitude), and PPL per quantizer; unperturbed first."""
    variants = _variants(rows + quant_rows, baselines)
    head = "| " + " | ".join(variants) + " |"
    rule = "|---" * (len(variants) + 2) + "|"
    lines = ["# Perturbation analysis", "", "Validation perplexity; magnitude 0 is the unperturbed model.", "",
             "| perturbation | magnitude " + head, rule,
             "| none | 0 | " + " | ".join(_fmt(baselines.get(v)) for v in variants) + " |"]
    table: dict[tuple[str, float], dict[str, float]] = {}
    for r in rows:
        table.setdefault((r["perturbation"], r["magnitude"]), {})[r["variant"]] = r["ppl"]
    for (kind, magnitude), values in table.items():
        lines.append(f"| {kind} | {magnitude:g} | " + " | ".join(_fmt(values.get(v)) for v in variants) + " |")
    if descriptions:
        lines += ["", "Kinds:", ""] + [f"- `{k}`: {d}" for k, d in descriptions.items()]
    if quant_rows:
        lines += ["", "## Fake quantization", "", "| quantizer " + head, "|---" * (len(variants) + 1) + "|",
                  "| unquantized | " + " | ".join(_fmt(baselines.get(v)) for v in variants) + " |"]
        qtable: dict[str, dict[str, float]] = {}
        for r in quant_rows:
            qtable.setdefault(r["quantizer"], {})[r["variant"]] = r["ppl"]
        for name, values in qtable.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(values.get(v)) for v in variants) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def print_tables(rows, quant_rows, baselines: dict[str, float], console: Console | None = None) -> None:
    console = console or Console()
    variants = _variants(rows + quant_rows, baselines)
    table = Table(title="Validation perplexity under perturbation")
    for col in ("perturbation", "magnitude", *variants):
        table.add_column(col, justify="left" if col == "perturbation" else "right")
    table.add_row("none", "0", *[_fmt(baselines.get(v)) for v in variants])
    grouped: dict[tuple[str, float], dict[str, float]] = {}
    for r in rows:
        grouped.setdefault((r["perturbation"], r["magnitude"]), {})[r["variant"]] = r["ppl"]
    for (kind, magnitude), values in grouped.items():
        table.add_row(kind, f"{magnitude:g}", *[_fmt(values.get(v)) for v in variants])
    if rows:
        console.print(table)
    if quant_rows:
        qt = Table(title="Validation perplexity under fake quantization")
        for col in ("quantizer", *variants):
            qt.add_column(col, justify="left" if col == "quantizer" else "right")
        qt.add_row("unquantized", *[_fmt(baselines.get(v)) for v in variants])
        grouped_q: dict[str, dict[str, float]] = {}
        for r in quant_rows:
            grouped_q.setdefault(r["quantizer"], {})[r["variant"]] = r["ppl"]
        for name, values in grouped_q.items():
            qt.add_row(name, *[_fmt(values.get(v)) for v in variants])
        console.print(qt)


def plot_curves(rows: list[dict[str, Any]], descriptions: dict[str, str], path: Path) -> Path:
    """PPL against magnitude, one panel per kind and one line per variant; dotted: the variant's unperturbed PPL."""
    from matplotlib.ticker import NullFormatter

    kinds = list(dict.fromkeys(r["perturbation"] for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colors = {v: f"C{i}" for i, v in enumerate(variants)}
    fig, panels = panel_grid(len(kinds), 4.6, 3.6)
    for ax, kind in zip(panels, kinds):
        for variant in variants:
            points = sorted((r["magnitude"], r["ppl"]) for r in rows if r["perturbation"] == kind and r["variant"] == variant)
            if not points:
                continue
            ax.plot([m for m, _ in points], [p for _, p in points], marker="o", color=colors[variant], label=variant)
            base = next(r["ppl_unperturbed"] for r in rows if r["variant"] == variant)
            ax.axhline(base, color=colors[variant], linestyle=":", linewidth=1)
        magnitudes = sorted({r["magnitude"] for r in rows if r["perturbation"] == kind})
        if magnitudes[0] > 0 and magnitudes[-1] / magnitudes[0] >= 10:
            ax.set_xscale("log")
        ax.set_xticks(magnitudes, [f"{m:g}" for m in magnitudes], fontsize=7)  # the swept values, not log decades
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        ax.set_title(f"{kind}\n{descriptions.get(kind, '')}", fontsize=8)
        ax.set_xlabel("magnitude ε")
        ax.set_ylabel("validation PPL")
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize=8, title="dotted: unperturbed", title_fontsize=7)
    fig.suptitle("Perplexity vs perturbation magnitude")
    return save_figure(fig, path)


def plot_relative(rows: list[dict[str, Any]], baselines: dict[str, float], reference: str,
                  descriptions: dict[str, str], path: Path) -> Path:
    """Each variant's PPL divided by the ``reference`` variant's PPL at the same point (same noise draws),
    against magnitude (0 = unperturbed): below 1 where the variant is the more robust."""
    kinds = list(dict.fromkeys(r["perturbation"] for r in rows))
    variants = [v for v in dict.fromkeys(r["variant"] for r in rows) if v != reference]
    ref = {(r["perturbation"], r["magnitude"]): r["ppl"] for r in rows if r["variant"] == reference}
    fig, panels = panel_grid(len(kinds), 4.6, 3.4)
    for ax, kind in zip(panels, kinds):
        magnitudes = sorted({r["magnitude"] for r in rows if r["perturbation"] == kind})
        xs = list(range(len(magnitudes) + 1))  # evenly spaced: 0 (unperturbed), then the swept values
        for i, variant in enumerate(variants, start=1):
            ppl = {r["magnitude"]: r["ppl"] for r in rows if r["perturbation"] == kind and r["variant"] == variant}
            ys = [baselines[variant] / baselines[reference]] + [
                ppl[m] / ref[(kind, m)] if m in ppl and (kind, m) in ref else float("nan") for m in magnitudes]
            ax.plot(xs, ys, marker="o", color=f"C{i}", label=variant)
        ax.axhline(1.0, color="C0", linestyle=":", linewidth=1)
        ax.set_xticks(xs, ["0"] + [f"{m:g}" for m in magnitudes], fontsize=7)
        ax.set_title(f"{kind}\n{descriptions.get(kind, '')}", fontsize=8)
        ax.set_xlabel("magnitude ε")
        ax.set_ylabel(f"PPL / PPL of {reference}")
        ax.grid(alpha=0.3)
    panels[0].legend(fontsize=8)
    fig.suptitle(f"Perplexity relative to {reference} at the same perturbation")
    return save_figure(fig, path)
