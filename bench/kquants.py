"""Cost of the llama.cpp twins as noise targets: one ``quantize_weight`` pass over every SmolLM2 decoder weight.

``noise=quant_error`` quantizes each merged weight matrix once per perturbed step, so this is the extra work a
step pays per target. Q4_0 (ggml's rounding) is the reference; Q4_K searches its scales like llama.cpp and
only applies to rows of a multiple of 256 (on SmolLM2 the 30 ``ffn_down``), so it is timed on those and
also reported per weight; the file types (Q4_K_M, IQ4_XS) quantize every matrix in its planned type; "+imatrix"
uses a random importance matrix (the search is as costly as with a real one). One run, wall and CPU seconds (the CPU
time moves less on a machine shared with other jobs):

    python bench/kquants.py                      # SmolLM2-135M, torch's threads
    python bench/kquants.py --threads 1 --out docs/bench/kquants.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from common import load_config, machine, write_json


def timed(quantizer, linears: dict, names: list[str]) -> tuple[float, float]:
    """Wall and CPU seconds (the process's, all threads) of one pass."""
    start, cpu = time.perf_counter(), time.process_time()
    for name in names:
        quantizer.quantize_weight(linears[name].weight.detach().float(), name=name)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON file for the results")
    parser.add_argument("--only", nargs="+", default=None, metavar="ARM", help="time only these arms (e.g. q4_0 Q4_K_M)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hydra.utils import instantiate

    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.quant.ggml import GGMLQuantizer
    from npft_lightning.quant.kquants import KQuantizer
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType

    with tempfile.TemporaryDirectory() as out:
        model, _ = instantiate(load_config([f"model={args.model}"], out).model).load()
    model.to(args.device)
    linears = decoder_linears(model)
    every = list(linears)
    wide = [n for n in every if linears[n].in_features % 256 == 0]
    weights = {n: linears[n].weight.numel() for n in every}
    g = torch.Generator().manual_seed(0)
    imatrix = {n: torch.rand(linears[n].in_features, generator=g) for n in every}

    arms = [
        ("q4_0", GGMLQuantizer("q4_0"), every),
        ("q4_0 (ffn_down)", GGMLQuantizer("q4_0"), wide),
        ("q4_0+imatrix", GGMLQuantizer("q4_0").with_importance(imatrix), every),
        ("q4_k (ffn_down)", KQuantizer("q4_k"), wide),
        ("q4_k+imatrix (ffn_down)", KQuantizer("q4_k").with_importance(imatrix), wide),
        ("Q4_K_M", LlamaCppFileType("Q4_K_M").bind(linears), every),
        ("Q4_K_M+imatrix", LlamaCppFileType("Q4_K_M").with_importance(imatrix).bind(linears), every),
        ("IQ4_XS", LlamaCppFileType("IQ4_XS").bind(linears), every),
    ]
    rows = []
    reference = reference_cpu = None
    for label, quantizer, names in arms:
        if args.only and label not in args.only and label != "q4_0":  # q4_0: the reference of the ratios
            continue
        seconds, cpu = timed(quantizer, linears, names)
        n = sum(weights[name] for name in names)
        per_mweight, cpu_per_mweight = seconds / n * 1e6, cpu / n * 1e6
        reference, reference_cpu = reference or per_mweight, reference_cpu or cpu_per_mweight
        rows.append({"arm": label, "matrices": len(names), "weights": n, "seconds": seconds, "cpu_seconds": cpu,
                     "seconds_per_mweight": per_mweight, "ratio_per_weight_vs_q4_0": per_mweight / reference,
                     "cpu_ratio_per_weight_vs_q4_0": cpu_per_mweight / reference_cpu})
        print(f"{label:26s} {len(names):4d} matrices {n / 1e6:7.1f} M weights {seconds:8.2f} s (CPU {cpu:8.2f} s) "
              f"{per_mweight:8.3f} s/M  x{per_mweight / reference:6.1f} (CPU x{cpu_per_mweight / reference_cpu:6.1f}) vs q4_0",
              flush=True)
    if args.out:
        write_json(args.out, {"machine": machine(), "model": args.model, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
