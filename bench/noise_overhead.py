"""Per-step cost of NPFT noise: training step time with per-step noise / the same step without noise.

Both arms run in one process, interleaved (control, NPFT, control, NPFT, ...), on the same model,
data, steps and seed; the ratio of median step times is reported (absolute times are noisy here).
Outlier selection, fake-quant and curvature passes are outside the timed steps.

    python bench/noise_overhead.py                       # SmolLM2-135M, 0.05 % and 1 % outliers
    python bench/noise_overhead.py --model tiny-llama --steps 20 --rounds 3
"""

from __future__ import annotations

import argparse
import tempfile

from tqdm.auto import tqdm

from common import StepClock, load_config, machine, median, write_json


def timed_fit(overrides: list[str], steps: int) -> list[float]:
    from npft_lightning.callbacks import CurvatureProbe, FakeQuantValidation
    from npft_lightning.pipeline import build

    with tempfile.TemporaryDirectory() as out:
        cfg = load_config([*overrides, f"trainer.max_steps={steps}", "logger=none", "callbacks=none",
                           "trainer.enable_progress_bar=false", "trainer.limit_val_batches=0", "curvature=null"], out)
        module, dm, trainer, _ = build(cfg)
        shared: dict = {}
        keep = [c for c in trainer.callbacks if not isinstance(c, (FakeQuantValidation, CurvatureProbe))]
        trainer.callbacks[:] = [StepClock(True, shared), *keep, StepClock(False, shared)]
        trainer.fit(module, datamodule=dm)
        return shared["steps"][1:]  # the first step warms up allocators and caches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per arm and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 1.0], help="outlier ratios in percent")
    parser.add_argument("--noise", default="uniform_step")
    parser.add_argument("--out", default="docs/bench/noise_overhead.json")
    args = parser.parse_args()

    base = [f"model={args.model}", "outliers=magnitude", "quant=none"]
    results = []
    for ratio in args.ratios:
        arms = {"control": [*base, "noise=none", f"outliers.ratio={ratio}"],
                "npft": [*base, f"noise={args.noise}", f"outliers.ratio={ratio}"]}
        times: dict[str, list[float]] = {k: [] for k in arms}
        for _ in tqdm(range(args.rounds), desc=f"ratio {ratio} %"):
            for arm, overrides in arms.items():
                times[arm] += timed_fit(overrides, args.steps)
        row = {"ratio_pct": ratio, "control_median_s": median(times["control"]), "npft_median_s": median(times["npft"]),
               "steps_per_arm": len(times["npft"])}
        row["ratio"] = row["npft_median_s"] / row["control_median_s"]
        results.append(row)
        print(f"outliers {ratio} %: control {row['control_median_s']:.3f} s/step, NPFT {row['npft_median_s']:.3f} s/step, ratio {row['ratio']:.3f}")
    write_json(args.out, {"bench": "noise_overhead", "noise": args.noise, "model": args.model, "target": 1.03,
                          "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
