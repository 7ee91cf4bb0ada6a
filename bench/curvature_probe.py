"""Curvature on a fixed set of outliers for several trained adapters: Tr(H_MM) by perturbation and Hutchinson.

A training run's ``CurvatureProbe`` measures its own model before and after, on its own masks. To
compare runs on the SAME coordinates (NPFT vs the control, Fisher vs PQI outliers) this script takes
the outlier masks and σ from one run's checkpoint (``--masks-from``) and probes the pretrained model
and each adapter (merged) with the probe's estimators, windows and seed. Probing the masks' own run
reproduces its logged numbers, which the script checks.

    python bench/curvature_probe.py --masks-from /work/runs/pqi \\
        --runs control=/work/runs/control npft_fisher=/work/runs/npft npft_pqi=/work/runs/pqi
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import ROOT, load_config, machine, write_json
from tqdm.auto import tqdm


def load_probe_state(run: Path) -> dict[str, Any]:
    from npft_lightning.core.errors import UserError

    ckpt = run / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        raise UserError(f"--masks-from {run}: no checkpoints/last.ckpt; give the folder of a finished training run")
    callbacks = torch.load(ckpt, map_location="cpu", weights_only=False)["callbacks"]
    selection = next((v for k, v in callbacks.items() if k.startswith("OutlierSelection")), None)
    probe = next((v for k, v in callbacks.items() if k.startswith("CurvatureProbe")), None)
    if not selection or not selection.get("masks"):
        raise UserError(f"--masks-from {run}: its checkpoint holds no outlier masks")
    if not probe or probe.get("sigma") is None:
        raise UserError(f"--masks-from {run}: its checkpoint holds no curvature probe σ (was it run with curvature=null?)")
    return {"masks": selection["masks"], "sigma": float(probe["sigma"]), "results": probe.get("results", {})}


def probe(model, masks, windows, sigma: float, args) -> dict[str, float]:
    from npft_lightning.core.curvature import (
        hutchinson_trace,
        perturbation_trace_estimate,
    )
    from npft_lightning.core.layers import decoder_linears

    linears = decoder_linears(model)
    est = perturbation_trace_estimate(model, linears, masks, windows, sigma, draws=args.draws, seed=args.seed, progress=True)
    out = {"curvature_outliers": est["trace"], "curvature_stderr": est["stderr"], "clean_loss": est["clean_loss"]}
    if args.hutchinson_probes > 0:
        h = hutchinson_trace(model, linears, masks, windows, probes=args.hutchinson_probes, seed=args.seed, progress=True)
        out.update(hutchinson_outliers=h["trace"], hutchinson_stderr=h["stderr"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--masks-from", required=True, type=Path, help="training run folder whose masks and σ are used")
    parser.add_argument("--runs", nargs="*", default=[], help="NAME=RUN_DIR (its adapter/ is merged); the pretrained model is always probed")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", type=int, default=4, help="as curvature.windows")
    parser.add_argument("--length", type=int, default=512, help="as curvature.length")
    parser.add_argument("--seed", type=int, default=1234, help="as the CurvatureProbe seed")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--hutchinson-probes", type=int, default=2)
    parser.add_argument("--out", default="docs/bench/curvature_probe.json")
    args = parser.parse_args()

    from hydra.utils import instantiate
    from peft import PeftModel

    from npft_lightning.core.errors import UserError

    runs = {"pretrained": None}
    for item in args.runs:
        name, sep, path = item.partition("=")
        if not sep or not (Path(path) / "adapter" / "adapter_config.json").is_file():
            raise UserError(f"--runs {item!r}: expected NAME=RUN_DIR with RUN_DIR/adapter/adapter_config.json")
        runs[name] = Path(path) / "adapter"
    state = load_probe_state(args.masks_from)
    cfg = load_config([f"model={args.model}"], ROOT / "logs" / "bench")
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for name, adapter in tqdm(runs.items(), desc="models"):
        model, tokenizer = instantiate(cfg.model).load()
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
        model.eval()
        windows = instantiate(cfg.data, tokenizer=tokenizer).calibration_windows(args.windows, args.length, seed=args.seed)
        results[name] = probe(model, state["masks"], windows, state["sigma"], args)
        tqdm.write(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[name].items()))
        del model

    # The masks' own run logged its probe: the same estimators on the same model must give the same numbers.
    logged = state["results"]
    check = {}
    for stage, key in (("before", "pretrained"), ("after", next((n for n, a in runs.items() if a is not None and a.parent == args.masks_from), None))):
        if key and stage in logged:
            check[f"{stage} ({key})"] = {k: (logged[stage][k], results[key][k]) for k in ("curvature_outliers", "hutchinson_outliers")
                                         if k in logged[stage] and k in results[key]}
    for what, pairs in check.items():
        for k, (a, b) in pairs.items():
            print(f"check {what} {k}: logged {a:.6g}, re-probed {b:.6g}")

    write_json(args.out, {
        "bench": "curvature_probe", "command": " ".join(["python bench/curvature_probe.py", shlex.join(sys.argv[1:])]),
        "masks_from": str(args.masks_from), "sigma": state["sigma"], "outliers": sum(m.numel() for m in state["masks"].values()),
        "windows": args.windows, "length": args.length, "seed": args.seed, "draws": args.draws,
        "hutchinson_probes": args.hutchinson_probes, "machine": machine(), "seconds": time.perf_counter() - start,
        "results": results, "check_against_logged": check,
    })


if __name__ == "__main__":
    main()
