"""Re-quantizing weights that already lie on a quantizer's grid: ggml's block types on Gaussian weights and on
the same weights first put on the Q4_1 grid (as every weight of our SmolLM2, a dequantized Q4_1 file, is).

Prints, per type, the RMS error over the weights' standard deviation and the correlation between the error and
the (centred) weight: an error that follows the weight adds up instead of averaging out. docs/llamacpp_study.md
("Why Q5_K_M scores worse than Q4_K_M here") quotes it.

    python bench/grid_requant.py
"""

from __future__ import annotations

import argparse

import torch

from npft_lightning.quant.ggml import GGMLQuantizer

TYPES = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"]


def round_trip(weight: torch.Tensor, qtype: str) -> torch.Tensor:
    return GGMLQuantizer(qtype).quantize_weight(weight)


def error_stats(weight: torch.Tensor, qtype: str) -> tuple[float, float]:
    """(RMS error / std of the weight, correlation of the error with the centred weight; nan when lossless)."""
    error = (round_trip(weight, qtype) - weight).flatten()
    centred = (weight - weight.mean()).flatten()
    return float(error.pow(2).mean().sqrt() / weight.std()), float(torch.corrcoef(torch.stack([error, centred]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=576, help="rows = columns of the random matrix (SmolLM2's hidden size)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    gaussian = torch.randn(args.size, args.size) * 0.02
    for name, weight in {"Gaussian": gaussian, "on the Q4_1 grid": round_trip(gaussian, "q4_1")}.items():
        print(name)
        for qtype in TYPES:
            rms, corr = error_stats(weight, qtype)
            print(f"  {qtype}: RMS error {rms:.4f} std, correlation with the weight {corr:+.3f}")


if __name__ == "__main__":
    main()
