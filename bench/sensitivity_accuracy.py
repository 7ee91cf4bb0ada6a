"""Which sensitivity metric predicts the loss a quantizer costs? Predicted vs measured, per weight matrix.

Part 1, one matrix at a time. For each chosen decoder Linear W (default: all 7 kinds q/k/v/o/gate/
up/down in layers 3 and 25 of SmolLM2-135M, 14 matrices) the target quantizer gives Δ = Q(W) − W,
and each metric predicts the change of the mean per-token NLL when that matrix ALONE is quantized:

  fisher       ½ Σ F̄·Δ²                 F̄ = (1/B) Σ_b (∂L_b/∂W)²
  taylor       Σ ḡ·Δ + ½ Σ F̄·Δ²         ḡ = (1/B) Σ_b ∂L_b/∂W, the gradient of the mean calibration loss
  hvp          Σ ḡ·Δ + ½ ΔᵀH̄Δ           exact second-order Taylor, Hessian-vector product (--hvp, costly)
  integral     Σ Δ ⊙ mean_k ∇L̄(W + t_k Δ), t_k = (k − ½)/N   the signed PQI sum (PQI = |·| elementwise)
  calibration  L̄_cal(Q(W)) − L̄_cal(W)   measured on the calibration windows: what the integral converges to

L_b is the mean next-token NLL of calibration window b (B windows of --calibration-length tokens,
train split), L̄ their mean. Each prediction is compared with the measured change of the mean
per-token NLL on held-out windows (validation split, never used for calibration): Spearman rank
correlation across the matrices and the median ratio predicted / measured.

Part 2, the whole model (--keep-ratio > 0): RTN on every decoder Linear, keeping the top p % of
each matrix in full precision (dense-and-sparse), the kept entries chosen by each selector:
Fisher F̄, |PQI| (the joint path of all matrices, as the outlier selector computes it), |w|, random.
Held-out PPL per selector: which selector finds the weights whose quantization actually hurts.

    python bench/sensitivity_accuracy.py                              # ~15 min on 2 CPU cores
    python bench/sensitivity_accuracy.py --quantizers rtn4 rtn3_g32 --intervals 4 --hvp
    python bench/sensitivity_accuracy.py --model tiny-llama --layers 0 1 --calibration-windows 2 --keep-ratio 1
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, load_config, machine, write_json
from tqdm.auto import tqdm

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METRICS = ("fisher", "taylor", "hvp", "integral", "calibration")
NOTES_MARK = "<!-- notes: hand-written below this line; kept when the bench rewrites the file -->"


def spearman(x: list[float], y: list[float]) -> float:
    from torchmetrics.functional import spearman_corrcoef

    if len(x) < 3:
        return math.nan
    return float(spearman_corrcoef(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))


def pick_matrices(linears: dict[str, Any], layers: list[int], kinds: list[str]) -> list[str]:
    from npft_lightning.core.errors import UserError
    from npft_lightning.core.layers import block_index

    names = [n for n in linears if block_index(n) in layers and n.rsplit(".", 1)[-1] in kinds]
    if not names:
        raise UserError(f"--layers {layers} --kinds {kinds} match no decoder linear; e.g. {next(iter(linears))}")
    return names


def part_one(model, linears, names, quantizer, calib, heldout, args, base: dict[str, float], grad, fisher) -> list[dict]:
    from npft_lightning.core.curvature import hessian_quadratic_form, mean_loss
    from npft_lightning.core.gradients import taylor_loss_change
    from npft_lightning.npft.outliers import pqi_scores
    from npft_lightning.quant import fake_quantized

    rows = []
    for name in tqdm(names, desc=f"{quantizer.name}: matrices"):
        lin = linears[name]
        w = lin.weight.detach().float()
        delta = quantizer.quantize_weight(w, name=name) - w
        row: dict[str, Any] = {"matrix": name, "numel": w.numel(), "delta_sq_sum": float(delta.double().square().sum())}
        seconds: dict[str, float] = {}
        row["fisher"] = taylor_loss_change(delta, fisher[name])
        row["taylor"] = taylor_loss_change(delta, fisher[name], grad[name])
        t0 = time.perf_counter()
        signed = pqi_scores(model, {name: lin}, quantizer, calib, intervals=args.intervals, batch_size=1, signed=True,
                            progress=True)[name]
        row["integral"] = float(signed.double().sum()) / calib.size(0)
        seconds["integral"] = time.perf_counter() - t0
        if args.hvp:
            t0 = time.perf_counter()
            row["hvp"] = float((grad[name].double() * delta.double()).sum()) + 0.5 * hessian_quadratic_form(
                model, {name: lin}, {name: delta}, calib, progress=True)
            seconds["hvp"] = time.perf_counter() - t0
        with torch.no_grad(), fake_quantized(model, {name: lin}, quantizer):
            row["calibration"] = mean_loss(model, list(calib.split(1))) - base["calibration"]
            row["heldout"] = mean_loss(model, list(heldout.split(1))) - base["heldout"]
        row["seconds"] = seconds
        rows.append(row)
        tqdm.write(f"{name}: held-out {row['heldout']:+.3e}  calibration {row['calibration']:+.3e}  "
                   f"integral {row['integral']:+.3e}  taylor {row['taylor']:+.3e}  fisher {row['fisher']:+.3e}")
    return rows


def summarise(rows: list[dict]) -> dict[str, dict[str, float]]:
    actual = [r["heldout"] for r in rows]
    out = {}
    for metric in METRICS:
        if not all(metric in r for r in rows):
            continue
        pred = [r[metric] for r in rows]
        ratios = [p / a for p, a in zip(pred, actual) if a != 0]
        out[metric] = {
            "spearman_heldout": spearman(pred, actual),
            "spearman_calibration": spearman(pred, [r["calibration"] for r in rows]),
            "median_ratio": statistics.median(ratios) if ratios else math.nan,
            "sign_agreement": sum((p > 0) == (a > 0) for p, a in zip(pred, actual)) / len(rows),
        }
    return out


def part_two(model, linears, quantizer, calib, heldout, args, fisher_all) -> dict[str, Any]:
    """Held-out PPL of the whole model quantized with the top ``keep_ratio`` % of each matrix kept, per selector."""
    from npft_lightning.core.curvature import mean_loss
    from npft_lightning.npft.outliers import pqi_scores
    from npft_lightning.quant import DenseAndSparse, fake_quantized

    t0 = time.perf_counter()
    pqi = pqi_scores(model, linears, quantizer, calib, intervals=args.intervals, progress=True)
    pqi_seconds = time.perf_counter() - t0
    generator = torch.Generator().manual_seed(args.seed)
    selectors = {
        "none (plain quantizer)": None,
        "fisher": fisher_all,
        "pqi": pqi,
        "magnitude": {n: lin.weight.detach().float().abs() for n, lin in linears.items()},
        "random": {n: torch.rand(lin.weight.shape, generator=generator) for n, lin in linears.items()},
    }
    results = {}
    for selector, scores in tqdm(selectors.items(), desc=f"{quantizer.name}: selectors"):
        if scores is None:
            q = quantizer
        else:
            q = DenseAndSparse(quantizer, keep_ratio=args.keep_ratio)
            q.sensitivity = scores
        with torch.no_grad(), fake_quantized(model, linears, q):
            loss = mean_loss(model, list(heldout.split(1)))
        results[selector] = {"heldout_loss": loss, "heldout_ppl": math.exp(loss)}
        tqdm.write(f"{quantizer.name} keep {args.keep_ratio} % by {selector}: held-out PPL {math.exp(loss):.3f}")
    return {"keep_ratio_pct": args.keep_ratio, "pqi_seconds": pqi_seconds, "selectors": results}


def write_markdown(path: Path, report: dict[str, Any]) -> None:
    from npft_lightning.core.io import atomic_write_text

    cfg = report["config"]
    lines = [
        "# Does a sensitivity metric predict the loss that quantization costs?",
        "",
        f"Generated by `bench/sensitivity_accuracy.py` on {report['machine']['date']} "
        f"({report['machine']['cpu']}, {report['machine']['threads']} threads, torch {report['machine']['torch']}); "
        f"{report['seconds_total'] / 60:.1f} min in all.",
        "",
        "```bash",
        report["command"],
        "```",
        "",
        f"Model `{cfg['model']}` (fp32). Calibration: {cfg['calibration_windows']} windows × {cfg['calibration_length']} "
        f"tokens of the train split (seed {cfg['seed']}). Held-out: the first {cfg['heldout_windows']} windows × "
        f"{cfg['heldout_length']} tokens of the validation split. Integral: midpoint rule, {cfg['intervals']} intervals.",
        "",
        "**Convention.** L_b = mean next-token NLL of calibration window b; ḡ = mean over windows of ∂L_b/∂W; "
        "F̄ = mean over windows of (∂L_b/∂W)² (the NPFT/SqueezeLLM Fisher divided by the number of windows). Every "
        "prediction and every measurement is a change of the mean per-token NLL (nats), for quantizing ONE matrix "
        "while all others stay in fp32. Ratios are predicted / measured on held-out windows.",
        "",
        "| metric | formula |",
        "|---|---|",
        "| fisher | ½ Σ F̄·Δ² |",
        "| taylor | Σ ḡ·Δ + ½ Σ F̄·Δ² |",
        "| hvp | Σ ḡ·Δ + ½ ΔᵀH̄Δ (exact Hessian along Δ) |",
        "| integral | Σ Δ ⊙ mean_k ∇L̄(W + t_k Δ), the signed PQI sum |",
        "| calibration | measured change on the calibration windows (the integral's limit; not a predictor of its own) |",
        "",
    ]
    for qname, block in report["quantizers"].items():
        rows = block["rows"]
        lines += [f"## {qname}: {len(rows)} matrices", "",
                  "| metric | Spearman ρ vs held-out | Spearman ρ vs calibration-measured | median predicted / held-out | sign agrees | seconds per matrix |",
                  "|---|---|---|---|---|---|"]
        for metric, s in block["summary"].items():
            secs = [r["seconds"].get(metric) for r in rows if metric in r["seconds"]]
            cost = f"{statistics.mean(secs):.0f}" if secs else ("(from one shared gradient pass)" if metric in ("fisher", "taylor") else "(forward only)")
            lines.append(f"| {metric} | {s['spearman_heldout']:.3f} | {s['spearman_calibration']:.3f} | "
                         f"{s['median_ratio']:.3g} | {100 * s['sign_agreement']:.0f} % | {cost} |")
        metrics = [m for m in METRICS if m in block["summary"]]
        lines += ["", "Per matrix (nats of mean NLL per token):", "",
                  "| matrix | held-out | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
        for r in rows:
            short = r["matrix"].replace("model.layers.", "L").replace("self_attn.", "").replace("mlp.", "")
            lines.append(f"| {short} | {r['heldout']:+.2e} | " + " | ".join(f"{r[m]:+.2e}" for m in metrics) + " |")
        if block.get("selection"):
            sel = block["selection"]
            lines += ["", f"Whole model, {qname} on all decoder linears, the top {sel['keep_ratio_pct']:g} % of each matrix "
                      f"kept in fp32 (dense-and-sparse), chosen by each selector; whole-model |PQI| took "
                      f"{sel['pqi_seconds']:.0f} s. Held-out PPL (fp32 model: {report['baseline']['heldout_ppl']:.3f}):", "",
                      "| kept by | held-out PPL |", "|---|---|"]
            for selector, res in sel["selectors"].items():
                lines.append(f"| {selector} | {res['heldout_ppl']:.3f} |")
        lines.append("")
    notes = ""
    if path.exists() and NOTES_MARK in path.read_text():
        notes = path.read_text().split(NOTES_MARK, 1)[1]
    atomic_write_text(path, "\n".join(lines) + "\n" + NOTES_MARK + (notes or "\n"))
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a conf/model option")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 25], help="decoder block indices")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), help="linear names within a block")
    parser.add_argument("--quantizers", nargs="+", default=["rtn4"], help="conf/quant options, e.g. rtn4 rtn3_g32")
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--calibration-length", type=int, default=512)
    parser.add_argument("--heldout-windows", type=int, default=8, help="first N windows of the validation split")
    parser.add_argument("--heldout-length", type=int, default=512)
    parser.add_argument("--intervals", type=int, default=2, help="midpoint-rule intervals of the path integral")
    parser.add_argument("--hvp", action="store_true", help="also the exact second-order Taylor term (double backprop)")
    parser.add_argument("--keep-ratio", type=float, default=0.5, help="part 2: percent of each matrix kept; 0 skips part 2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/bench/sensitivity_accuracy.json")
    parser.add_argument("--doc", default="docs/sensitivity_accuracy.md", help="markdown report ('' to skip)")
    args = parser.parse_args()

    from hydra.utils import instantiate

    from npft_lightning.core.curvature import mean_loss
    from npft_lightning.core.gradients import gradient_moments
    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.tasks.build import build_quantizers

    start = time.perf_counter()
    overrides = [f"model={args.model}", f"quant=[{','.join(args.quantizers)}]", f"seed={args.seed}",
                 f"data.eval_seq_len={args.heldout_length}", f"data.max_eval_windows={args.heldout_windows}"]
    cfg = load_config(overrides, ROOT / "logs" / "bench")
    model, tokenizer = instantiate(cfg.model).load()
    model.eval()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    calib = datamodule.calibration_windows(args.calibration_windows, args.calibration_length, seed=args.seed)
    heldout = datamodule.eval_windows("validation")
    quantizers = build_quantizers(cfg)
    linears = decoder_linears(model)
    names = pick_matrices(linears, args.layers, args.kinds)
    keep_all = args.keep_ratio > 0

    base = {"calibration": mean_loss(model, list(calib.split(1))), "heldout": mean_loss(model, list(heldout.split(1)))}
    print(f"{len(names)} matrices; fp32 loss: calibration {base['calibration']:.4f}, held-out {base['heldout']:.4f}")
    # One gradient pass gives ḡ and F̄ for every matrix (all of them when part 2 needs the Fisher selector).
    t0 = time.perf_counter()
    grad, fisher = gradient_moments(model, linears if keep_all else {n: linears[n] for n in names}, calib)
    gradient_seconds = time.perf_counter() - t0

    report: dict[str, Any] = {
        "bench": "sensitivity_accuracy",
        "command": " ".join(["python bench/sensitivity_accuracy.py", shlex.join(sys.argv[1:])]).strip(),
        "config": {"model": args.model, "matrices": names, "calibration_windows": args.calibration_windows,
                   "calibration_length": args.calibration_length, "heldout_windows": int(heldout.size(0)),
                   "heldout_length": int(heldout.size(1)), "intervals": args.intervals, "seed": args.seed,
                   "keep_ratio_pct": args.keep_ratio, "hvp": args.hvp},
        "convention": "L_b = mean next-token NLL of calibration window b; g = mean_b dL_b/dW; F = mean_b (dL_b/dW)^2; "
                      "all predictions and measurements are changes of the mean per-token NLL, one matrix quantized alone",
        "machine": machine(),
        "baseline": {"calibration_loss": base["calibration"], "heldout_loss": base["heldout"],
                     "heldout_ppl": math.exp(base["heldout"]), "gradient_pass_seconds": gradient_seconds},
        "quantizers": {},
    }
    for qname, quantizer in quantizers.items():
        rows = part_one(model, linears, names, quantizer, calib, heldout, args, base, grad, fisher)
        block: dict[str, Any] = {"rows": rows, "summary": summarise(rows)}
        report["quantizers"][qname] = block
        write_json(args.out, report)  # partial results survive an interrupted run
        if keep_all:
            block["selection"] = part_two(model, linears, quantizer, calib, heldout, args, fisher)
        for metric, s in block["summary"].items():
            print(f"{qname} {metric:12s} spearman {s['spearman_heldout']:+.3f}  median ratio {s['median_ratio']:.3g}")

    report["seconds_total"] = time.perf_counter() - start
    write_json(args.out, report)
    if args.doc:
        write_markdown(Path(args.doc), report)


if __name__ == "__main__":
    main()
