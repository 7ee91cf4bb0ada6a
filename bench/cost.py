"""What NPFT's machinery costs, as ratios of two arms measured side by side in one process.

Absolute times on a shared CPU are noisy, so every timing is a ratio of two arms run on the same
model and windows, interleaved (A B, B A, A B, ...), each the median over ``--rounds``:

  sensitivity   Fisher pass over N calibration windows / N plain forward+backward passes that
                compute the same weight gradients (without squaring and accumulating)   target <= 1.10
  mask_memory   outlier-mask index bytes / model weight bytes, at several ratios        target <= 0.2 %
  fake_quant    RTN fake-quant validation (quantize, score, restore) / plain scoring      target <= 1.10
  eval_speed    tokens/s of the project's PPL path / a bare HF loop (model(ids, labels=ids))  target >= 0.95
  train_memory  peak resident memory of `python train.py trainer.max_steps=2` (a child process)
  npft_step     NPFT step / control step, from docs/bench/noise_overhead.json (or run small)  target <= 1.03

A missed timing target gets the top operators of both arms (torch.profiler, self CPU time).

    python bench/cost.py                                   # SmolLM2-135M, writes docs/bench/cost.json
    python bench/cost.py --only npft_step                  # re-measure one section, merged into the file
    python bench/cost.py --model tiny-llama --seq-len 128 --eval-seq-len 256 --out /tmp/cost_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from common import ROOT, load_config, machine, median, write_json
from hydra.utils import instantiate
from tqdm.auto import tqdm

SECTIONS = ["sensitivity", "mask_memory", "fake_quant", "eval_speed", "train_memory", "npft_step"]
TARGETS = {"sensitivity": 1.10, "mask_memory_pct": 0.2, "fake_quant": 1.10, "eval_speed": 0.95, "npft_step": 1.03}


# --------------------------------------------------------------------------------------------
# Timing harness
# --------------------------------------------------------------------------------------------


def interleaved(arms: dict[str, Callable[[], Any]], rounds: int, desc: str) -> dict[str, list[float]]:
    """Wall time of each arm, ``rounds`` times, alternating the order every round to cancel drift."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for r in tqdm(range(rounds), desc=desc):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return times


def ratio_row(times: dict[str, list[float]], num: str, den: str, target: float, higher_is_better: bool = False) -> dict[str, Any]:
    row = {f"{name}_median_s": median(ts) for name, ts in times.items()}
    row.update({f"{name}_all_s": [round(t, 4) for t in ts] for name, ts in times.items()})
    row["ratio"] = row[f"{num}_median_s"] / row[f"{den}_median_s"]
    row["target"] = target
    row["met"] = row["ratio"] >= target if higher_is_better else row["ratio"] <= target
    if not row["met"]:
        row["missed_by_pct"] = 100 * abs(row["ratio"] - target) / target
    return row


def top_ops(fn: Callable[[], Any], limit: int = 8) -> list[dict[str, Any]]:
    """The operators with the most self CPU time in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [{"op": e.key, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 2), "calls": e.count} for e in events]


def explain_if_missed(row: dict[str, Any], arms: dict[str, Callable[[], Any]]) -> None:
    if not row["met"]:
        row["profile_top_ops"] = {name: top_ops(fn) for name, fn in arms.items()}


# --------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------


def sensitivity_cost(model, linears, windows, rounds: int) -> dict[str, Any]:
    """Fisher diagonal over the windows vs the same backward passes into the same weights, nothing else."""
    from npft_lightning.core.gradients import (
        causal_lm_loss,
        eval_mode,
        fisher_diagonal,
        grads_only_on,
    )

    weights = {name: lin.weight for name, lin in linears.items()}

    def plain() -> None:
        with eval_mode(model), grads_only_on(model, weights), torch.enable_grad():
            for window in windows.split(1):
                causal_lm_loss(model, window).backward()
            for w in weights.values():
                w.grad = None

    def fisher() -> None:
        fisher_diagonal(model, linears, windows, batch_size=1, progress=False)

    arms = {"fisher": fisher, "plain_backward": plain}
    plain()  # warm-up: allocator and kernels
    row = ratio_row(interleaved(arms, rounds, "sensitivity"), "fisher", "plain_backward", TARGETS["sensitivity"])
    row.update(windows=int(windows.size(0)), window_tokens=int(windows.size(1)))
    explain_if_missed(row, arms)
    return row


def mask_memory(model, linears, ratios: list[float]) -> dict[str, Any]:
    """Bytes of the index masks at each ratio, against all model weights and against the decoder linears."""
    from npft_lightning.npft.outliers import (
        magnitude_scores,
        mask_bytes,
        select_outliers,
    )

    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    linear_bytes = sum(lin.weight.numel() * lin.weight.element_size() for lin in linears.values())
    scores = magnitude_scores(linears)  # the mask size depends on the ratio only, not on the score
    rows = []
    for ratio in ratios:
        masks = select_outliers(scores, ratio)
        size = mask_bytes(masks)
        pct = 100 * size / model_bytes
        rows.append({"ratio_pct": ratio, "outliers": sum(m.numel() for m in masks.values()), "mask_bytes": size,
                     "index_dtype": str(next(iter(masks.values())).dtype), "pct_of_model_weight_bytes": pct,
                     "pct_of_decoder_linear_bytes": 100 * size / linear_bytes,
                     "target_pct": TARGETS["mask_memory_pct"], "met": pct <= TARGETS["mask_memory_pct"]})
    return {"model_weight_bytes": model_bytes, "decoder_linear_bytes": linear_bytes, "rows": rows}


def fake_quant_cost(model, linears, windows, rounds: int) -> dict[str, Any]:
    """Scoring under RTN-4 fake quantization (quantize, score, restore) vs plain scoring, same windows."""
    from npft_lightning.core.perplexity import dataset_nll
    from npft_lightning.quant import RTN, fake_quantized

    rtn = RTN(bits=4, name="rtn4")

    def plain() -> None:
        dataset_nll(model, windows.split(1))

    def quantized() -> None:
        with torch.no_grad(), fake_quantized(model, linears, rtn):
            dataset_nll(model, windows.split(1))

    def quantize_only() -> None:
        with torch.no_grad(), fake_quantized(model, linears, rtn):
            pass

    arms = {"fake_quant": quantized, "plain": plain}
    plain()
    times = interleaved({**arms, "quantize_and_restore": quantize_only}, rounds, "fake-quant")
    row = ratio_row(times, "fake_quant", "plain", TARGETS["fake_quant"])
    # The quantize+restore cost is fixed per validation, so the ratio falls with the number of windows.
    per_window = row["plain_median_s"] / windows.size(0)
    row["windows_for_target"] = row["quantize_and_restore_median_s"] / (per_window * (TARGETS["fake_quant"] - 1))
    row.update(windows=int(windows.size(0)), window_tokens=int(windows.size(1)))
    explain_if_missed(row, arms)
    return row


def eval_speed(model, windows, rounds: int) -> dict[str, Any]:
    """Tokens/s of the project's perplexity path (as eval.py runs it) vs a bare Hugging Face loss loop."""
    from npft_lightning.core.perplexity import dataset_nll, perplexity

    results: dict[str, float] = {}

    def project() -> None:
        batches = tqdm(windows.split(1), desc="project", leave=False)
        results["project"] = perplexity(*dataset_nll(model, batches, torch.device("cpu")))

    @torch.no_grad()
    def bare() -> None:
        nll, count = 0.0, 0
        for window in windows.split(1):
            loss = model(input_ids=window, labels=window).loss
            nll += loss.item() * (window.size(1) - 1)
            count += window.size(1) - 1
        results["bare_hf"] = float(torch.tensor(nll / count).exp())

    arms = {"project": project, "bare_hf": bare}
    bare()
    times = interleaved(arms, rounds, "eval speed")
    tokens = windows.numel()
    row = ratio_row(times, "bare_hf", "project", TARGETS["eval_speed"], higher_is_better=True)  # = tok/s ratio
    row.update(project_tokens_per_s=tokens / row["project_median_s"], bare_hf_tokens_per_s=tokens / row["bare_hf_median_s"],
               ppl_project=results["project"], ppl_bare_hf=results["bare_hf"], windows=int(windows.size(0)),
               window_tokens=int(windows.size(1)))
    explain_if_missed(row, arms)
    return row


def child_peak_rss(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; its own peak resident memory (ru_maxrss of that child, via wait4) and wall time."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a chatty child never blocks on a full pipe
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # the rusage of this child alone (RUSAGE_CHILDREN is the max over all)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n{log.read()[-3000:]}")
    # Linux reports ru_maxrss in KiB.
    return {"command": " ".join(command), "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_s": time.perf_counter() - start}


def train_memory(model_name: str, steps: int, extra: list[str]) -> dict[str, Any]:
    """Peak RSS of a default training run and, for scale, of a process that only loads the model."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as out:
        train_cmd = [sys.executable, "train.py", f"model={model_name}", f"trainer.max_steps={steps}",
                     f"hydra.run.dir={out}/train", *extra]
        load_code = ("import sys; sys.path.insert(0, 'bench'); from common import load_config; from hydra.utils import instantiate; "
                     f"cfg = load_config({[f'model={model_name}', *extra]!r}, {out!r}); instantiate(cfg.model).load()")
        rows = {}
        for name, cmd in tqdm({"load_model_only": [sys.executable, "-c", load_code], "train": train_cmd}.items(), desc="peak RSS"):
            rows[name] = child_peak_rss(cmd, env)
    rows["train"]["max_steps"] = steps
    return rows


def npft_step_ratio(args: argparse.Namespace) -> dict[str, Any]:
    """NPFT step / control step: the lead's noise_overhead.json if present, else a small run of that bench."""
    path = out_path(args.noise_overhead)
    source = "reused"
    if not path.is_file():
        source = "run here (small settings)"
        path = out_path(args.out).with_name("noise_overhead_small.json")
        subprocess.run([sys.executable, str(ROOT / "bench" / "noise_overhead.py"), "--model", args.model, "--steps", "3",
                        "--rounds", "2", "--ratios", "0.5", "--out", str(path)], check=True, cwd=ROOT)
    data = json.loads(path.read_text())
    rows = [{**r, "target": TARGETS["npft_step"], "met": r["ratio"] <= TARGETS["npft_step"]} for r in data["results"]]
    return {"source": source, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path),
            "model": data.get("model"), "noise": data.get("noise"), "machine": data.get("machine"), "rows": rows}


# --------------------------------------------------------------------------------------------


def out_path(path: str) -> Path:
    """Relative output paths are relative to the repository root, wherever the script is started."""
    return Path(path) if Path(path).is_absolute() else ROOT / path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3, help="repetitions of each timed arm (medians reported)")
    parser.add_argument("--calib-windows", type=int, default=4, help="windows of the sensitivity pass")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration window length")
    parser.add_argument("--eval-windows", type=int, default=4, help="validation windows (the recipe validates on 4)")
    parser.add_argument("--eval-seq-len", type=int, default=2048)
    parser.add_argument("--mask-ratios", type=float, nargs="+", default=[0.05, 0.5, 1.0],
                        help="outlier ratios in percent (0.05: conf/outliers/fisher.yaml's, the paper's; 0.5: the npft_fisher recipe)")
    parser.add_argument("--train-steps", type=int, default=2, help="steps of the training run whose peak RSS is measured")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="measure only these sections and merge them into an existing --out file")
    parser.add_argument("--noise-overhead", default="docs/bench/noise_overhead.json",
                        help="result of bench/noise_overhead.py to reuse for npft_step (run small here if missing)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="extra Hydra override for the model/data config and the training run (repeatable)")
    parser.add_argument("--out", default="docs/bench/cost.json")
    args = parser.parse_args()

    out = out_path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if set(args.only) != set(SECTIONS) and out.is_file() else {}
    if result.get("model", args.model) != args.model:
        raise SystemExit(f"error: {out} holds results of model {result['model']!r}; use another --out for {args.model!r}")
    result.update({"bench": "cost", "model": args.model, "targets": TARGETS})
    commands = result.setdefault("commands", {})
    command = "python bench/cost.py " + " ".join(sys.argv[1:])

    torch.manual_seed(0)
    if set(args.only) - {"npft_step"}:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config([f"model={args.model}", *args.overrides], tmp)
        model, tokenizer = instantiate(cfg.model).load()
        datamodule = instantiate(cfg.data, tokenizer=tokenizer, eval_seq_len=args.eval_seq_len, max_eval_windows=args.eval_windows)
        from npft_lightning.core.layers import decoder_linears

        linears = decoder_linears(model)
        calib = datamodule.calibration_windows(args.calib_windows, args.seq_len, seed=0)
        eval_windows = datamodule.eval_windows("validation")
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    for section in args.only:
        if section == "sensitivity":
            result[section] = sensitivity_cost(model, linears, calib, args.rounds)
        elif section == "mask_memory":
            result[section] = mask_memory(model, linears, args.mask_ratios)
        elif section == "fake_quant":
            result[section] = fake_quant_cost(model, linears, eval_windows, args.rounds)
        elif section == "eval_speed":
            result[section] = eval_speed(model, eval_windows, args.rounds)
        elif section == "train_memory":
            result[section] = {**train_memory(args.model, args.train_steps, args.overrides), "model_weight_bytes": weight_bytes}
        elif section == "npft_step":
            result[section] = npft_step_ratio(args)
        result[section]["machine"] = machine()
        commands[section] = command
    write_json(out, result)
    print_summary(result)


def print_summary(result: dict[str, Any]) -> None:
    def mark(row: dict[str, Any]) -> str:
        return "met" if row["met"] else f"MISSED by {row.get('missed_by_pct', 0):.1f} %"

    for key in ("sensitivity", "fake_quant", "eval_speed"):
        if key not in result:
            continue
        row = result[key]
        print(f"{key:12s} ratio {row['ratio']:.3f} (target {'>=' if key == 'eval_speed' else '<='} {row['target']}): {mark(row)}")
    for row in result.get("mask_memory", {}).get("rows", []):
        print(f"mask memory at {row['ratio_pct']} %: {row['mask_bytes'] / 2**20:.2f} MiB = "
              f"{row['pct_of_model_weight_bytes']:.3f} % of weights (target <= 0.2 %): {'met' if row['met'] else 'MISSED'}")
    if "train_memory" in result:
        mem = result["train_memory"]
        print(f"peak RSS: training {mem['train']['peak_rss_bytes'] / 2**30:.2f} GiB, model load only "
              f"{mem['load_model_only']['peak_rss_bytes'] / 2**30:.2f} GiB")
    for row in result.get("npft_step", {}).get("rows", []):
        print(f"NPFT step / control step at {row['ratio_pct']} %: {row['ratio']:.3f} (target <= 1.03): {'met' if row['met'] else 'MISSED'}")


if __name__ == "__main__":
    main()
