"""Per-step cost of NPFT noise: training step time with per-step noise / the same step without noise.

Both arms run in one process, interleaved (control, NPFT, control, NPFT, ...), on the same model,
data, steps and seed; the ratio of median step times is reported (absolute times are noisy here).
Outlier selection, fake-quant and curvature passes are outside the timed steps.

    python bench/noise_overhead.py                       # SmolLM2-135M, 0.05 % and 1 % outliers
    python bench/noise_overhead.py --model tiny-llama --steps 20 --rounds 3
    python bench/noise_overhead.py --arm "qerr_all=noise=quant_error outliers=all" \
        --arm "qerr_0.5=noise=quant_error outliers.ratio=0.5" --out docs/bench/noise_overhead_qerr.json

``--arm NAME=OVERRIDES`` (repeatable) times any noise configuration against the control instead of
``--noise`` at each of ``--ratios``; targets: 1.10 for every-weight arms (``outliers=all``), 1.03 otherwise.
"""

from __future__ import annotations

import argparse
import tempfile

from common import StepClock, load_config, machine, median, write_json
from tqdm.auto import tqdm


def timed_fit(overrides: list[str], steps: int) -> list[float]:
    from npft_lightning.tasks.train import build
    from npft_lightning.training.callbacks import CurvatureProbe, FakeQuantValidation

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config([*overrides, f"trainer.max_steps={steps}", "logger=none", "callbacks=none",
                           "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "curvature=null"], out)
        module, dm, trainer, _ = build(cfg)
        shared: dict = {}
        keep = [c for c in trainer.callbacks if not isinstance(c, (FakeQuantValidation, CurvatureProbe))]
        trainer.callbacks[:] = [StepClock(True, shared), *keep, StepClock(False, shared)]
        trainer.fit(module, datamodule=dm)
        return shared["steps"][1:]  # the first step warms up allocators and caches


def parse_arm(value: str) -> tuple[str, list[str]]:
    """``"qerr_all=noise=quant_error outliers=all"`` -> ``("qerr_all", ["noise=quant_error", "outliers=all"])``."""
    name, _, overrides = value.partition("=")
    if not name or not overrides.strip():
        raise SystemExit(f"error: --arm {value!r}: write NAME=OVERRIDES, e.g. 'qerr_all=noise=quant_error outliers=all'")
    return name, overrides.split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 1.0], help="outlier ratios in percent")
    parser.add_argument("--noise", default="uniform_step")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a noise configuration to time against the control, e.g. 'qerr_all=noise=quant_error outliers=all'")
    parser.add_argument("--out", default="docs/bench/noise_overhead.json")
    args = parser.parse_args()

    base = [f"model={args.model}", "outliers=magnitude", "quant=none"]
    if args.model.startswith("tiny"):  # the tiny test models have a 512-token context
        base += ["data.seq_len=64", "data.eval_seq_len=128", "outliers.calibration_length=64"]
    if args.arm:
        named = [parse_arm(a) for a in args.arm]
    else:
        named = [(f"{args.noise} {ratio} %", [f"noise={args.noise}", f"outliers.ratio={ratio}"]) for ratio in args.ratios]
    results = []
    for name, overrides in named:
        arms = {"control": [*base, "noise=none"], "npft": [*base, *overrides]}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in tqdm(range(args.rounds), desc=name):
            for arm, arm_overrides in arms.items():
                times[arm] += timed_fit(arm_overrides, args.steps)
        dense = "outliers=all" in overrides
        row = {"arm": name, "overrides": overrides, "control_median_s": median(times["control"]), "npft_median_s": median(times["npft"]),
               "steps_per_arm": len(times["npft"]), "target": 1.10 if dense else 1.03}
        ratio = next((float(o.split("=", 1)[1]) for o in overrides if o.startswith("outliers.ratio=")), None)
        if ratio is not None:
            row["ratio_pct"] = ratio
        row["ratio"] = row["npft_median_s"] / row["control_median_s"]
        row["met"] = row["ratio"] <= row["target"]
        results.append(row)
        print(f"{name}: control {row['control_median_s']:.3f} s/step, noise {row['npft_median_s']:.3f} s/step, "
              f"ratio {row['ratio']:.3f} (target {row['target']}: {'met' if row['met'] else 'missed'})")
    write_json(args.out, {"bench": "noise_overhead", "noise": args.noise, "model": args.model,
                          "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
