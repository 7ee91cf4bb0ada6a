"""Per-step cost of NPFT noise: training step time with per-step noise / the same step without noise.

Both arms run in one process, interleaved (control, NPFT, control, NPFT, ...), on the same model,
data, steps and seed; the ratio of median step times is reported (absolute times are noisy here).
Outlier selection, fake-quant and curvature passes are outside the timed steps.

    python bench/noise_overhead.py                       # SmolLM2-135M, 0.05 % and 1 % outliers
    python bench/noise_overhead.py --model tiny-llama --steps 20 --rounds 3
    python bench/noise_overhead.py --arm "qerr_all=noise=quant_error outliers=all" \
        --arm "qerr_0.5=noise=quant_error outliers.ratio=0.5" --out docs/bench/noise_overhead_qerr.json

``--arm NAME=OVERRIDES`` (repeatable; the default recipe perturbs 15 % of the steps, so give the arm
``noise.step_probability=1.0`` to time the perturbed step) times any noise configuration against the control instead of
``--noise`` at each of ``--ratios``; targets: 1.10 for every-weight arms (``outliers=all``), 1.03 otherwise.
``--one-control`` times the control once per round for all arms (one control, the arms' ratios comparable);
each row also gives the ratio of the process's CPU time per step, steadier than wall time on a shared machine.
The exact-error step aimed at each llama.cpp target (docs/bench/noise_overhead_targets.json):

    S="noise=quant_error outliers=all noise.step_probability=1.0"   # every step at the exact error
    python bench/noise_overhead.py --steps 3 --rounds 1 --one-control --arm "rtn4=$S" \
        --arm "q4_0=$S quant=[q4_0] noise.distribution.quantizer=\${quant.q4_0}" \
        --arm "q4_k_m=$S quant=[llamacpp_q4_k_m] noise.distribution.quantizer=\${quant.llamacpp_q4_k_m}" \
        --arm "q4_0_imatrix=$S quant=[llamacpp_q4_0] noise.distribution.quantizer=\${quant.llamacpp_q4_0} imatrix=calibration calibration.windows=8" \
        --arm "q4_k_m_imatrix=$S quant=[llamacpp_q4_k_m] noise.distribution.quantizer=\${quant.llamacpp_q4_k_m} imatrix=calibration calibration.windows=8" \
        --out docs/bench/noise_overhead_targets.json
"""

from __future__ import annotations

import argparse
import tempfile

from common import StepClock, load_config, machine, median, write_json
from tqdm.auto import tqdm


def timed_fit(overrides: list[str], steps: int) -> tuple[list[float], list[float]]:
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
        return shared["steps"][1:], shared["cpu_steps"][1:]  # the first step warms up allocators and caches


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
    parser.add_argument("--one-control", action="store_true", help="time the control once per round for all arms")
    parser.add_argument("--out", default="docs/bench/noise_overhead.json")
    args = parser.parse_args()

    base = [f"model={args.model}", "outliers=magnitude"]
    if args.model.startswith("tiny"):  # the tiny test models have a 512-token context
        base += ["data.seq_len=64", "data.eval_seq_len=128", "outliers.calibration_length=64"]
    if args.arm:
        named = [parse_arm(a) for a in args.arm]
    else:
        named = [(f"{args.noise} {ratio} %", [f"noise={args.noise}", f"outliers.ratio={ratio}"]) for ratio in args.ratios]

    def arm_config(overrides: list[str]) -> list[str]:  # quant=none unless the arm picks a quantizer (its noise target)
        return [*base, *([] if any(o.startswith("quant=") for o in overrides) else ["quant=none"]), *overrides]

    control = arm_config(["noise=none"])
    # (wall, CPU) seconds per step of each arm; with --one-control the control's are shared by every row
    times: dict[str, tuple[list[float], list[float]]] = {}
    if args.one_control:
        times["control"] = ([], [])
        for _ in tqdm(range(args.rounds), desc="rounds"):
            for name, overrides in [("control", ["noise=none"]), *named]:
                wall, cpu = timed_fit(arm_config(overrides), args.steps)
                times.setdefault(name, ([], []))[0].extend(wall)
                times[name][1].extend(cpu)
    results = []
    for name, overrides in named:
        if not args.one_control:
            times["control"] = ([], [])
            times[name] = ([], [])
            for _ in tqdm(range(args.rounds), desc=name):
                for arm, arm_overrides in (("control", control), (name, arm_config(overrides))):
                    wall, cpu = timed_fit(arm_overrides, args.steps)
                    times[arm][0].extend(wall)
                    times[arm][1].extend(cpu)
        dense = "outliers=all" in overrides
        (control_wall, control_cpu), (arm_wall, arm_cpu) = times["control"], times[name]
        row = {"arm": name, "overrides": overrides, "control_median_s": median(control_wall), "npft_median_s": median(arm_wall),
               "control_cpu_median_s": median(control_cpu), "npft_cpu_median_s": median(arm_cpu),
               "steps_per_arm": len(arm_wall), "target": 1.10 if dense else 1.03}
        ratio = next((float(o.split("=", 1)[1]) for o in overrides if o.startswith("outliers.ratio=")), None)
        if ratio is not None:
            row["ratio_pct"] = ratio
        row["ratio"] = row["npft_median_s"] / row["control_median_s"]
        row["cpu_ratio"] = row["npft_cpu_median_s"] / row["control_cpu_median_s"]
        row["met"] = row["ratio"] <= row["target"]
        results.append(row)
        print(f"{name}: control {row['control_median_s']:.3f} s/step, noise {row['npft_median_s']:.3f} s/step, "
              f"ratio {row['ratio']:.3f} (CPU time {row['cpu_ratio']:.3f}; target {row['target']}: "
              f"{'met' if row['met'] else 'missed'})")
    write_json(args.out, {"bench": "noise_overhead", "noise": args.noise, "model": args.model, "one_control": args.one_control,
                          "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
