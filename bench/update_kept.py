"""How much of a LoRA fine-tune a llama.cpp file keeps, when the model was itself born as a GGUF file.

Both real models here are quantized files dequantized (SmolLM2: Q4_1; Gemma 3 270M: Q4_K_M), so every pretrained
weight lies on that file's grid. Quantizing the fine-tuned model W + ΔW again with the same llama.cpp file type can
put most weights back where they were, and the file loses the fine-tune. Per file type (each decoder linear in the
ggml type llama.cpp gives it, bit for bit: ``quant.llamacpp_filetype``) this reports:

- ``pretrained_on_grid``: the share of pretrained decoder weights the file type leaves unchanged (Q(W) == W);
- ``update_kept``: the projection of what the file changes, Q(W + ΔW) − Q(W), on the update ΔW, as a fraction of
  ΔW's squared norm (1: the file moves the weights by the update, on average; 0: the file undoes it), overall and
  per ggml type.

    python bench/update_kept.py --model gemma3-270m --adapter ADAPTER_DIR --file-types Q4_K_M Q4_0 \\
        --out-json docs/bench/update_kept_gemma3.json
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from typing import Any

import torch
from common import ROOT, load_config, machine, write_json
from torch import nn


def update_kept(base: dict[str, torch.Tensor], tuned: dict[str, nn.Linear], quantizer: Any) -> dict[str, Any]:
    """``pretrained_on_grid`` and ``update_kept`` (overall and per planned type) of ``quantizer`` (bound to ``tuned``)
    for the fine-tuned linears ``tuned`` against their pretrained weights ``base`` (same names)."""
    on_grid = total = 0
    sums: dict[str, list[float]] = {}  # type -> [<Q(W+dW) - Q(W), dW>, |dW|^2]
    for name, linear in tuned.items():
        w0, w = base[name].float(), linear.weight.detach().float()
        q0, q = quantizer.quantize_weight(w0, name=name).float(), quantizer.quantize_weight(w, name=name).float()
        on_grid += int((q0 == w0).sum())
        total += w0.numel()
        delta = w - w0
        entry = sums.setdefault(quantizer.type_of(name), [0.0, 0.0])
        entry[0] += float(((q - q0) * delta).sum())
        entry[1] += float((delta * delta).sum())
    kept = sum(e[0] for e in sums.values()) / max(sum(e[1] for e in sums.values()), 1e-30)
    return {"pretrained_on_grid": on_grid / total, "update_kept": kept,
            "by_type": {t: {"update_kept": a / max(b, 1e-30)} for t, (a, b) in sorted(sums.items())}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter", required=True, help="a trained run's adapter folder (train.py's <run>/adapter)")
    parser.add_argument("--file-types", nargs="+", default=["Q4_K_M", "Q4_0"])
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)

    from hydra.utils import instantiate

    from npft_lightning.core.errors import UserError
    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.lm.adapters import merge_adapter
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType, check_file_type

    try:
        file_types = [check_file_type(t) for t in args.file_types]
        cfg = load_config([f"model={args.model}"], ROOT / "logs" / "bench" / "update_kept")
        model, _ = instantiate(cfg.model).load()
        base = {n: l.weight.detach().clone() for n, l in decoder_linears(model).items()}
        tuned = decoder_linears(merge_adapter(model, "--adapter", args.adapter, cfg.model.name))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"bench": "update_kept", "date": date.today().isoformat(), "machine": machine(),
                              "command": "python bench/update_kept.py " + " ".join(sys.argv[1:] if argv is None else argv),
                              "model": args.model, "adapter": str(args.adapter), "file_types": {}}
    for file_type in file_types:
        report = update_kept(base, tuned, LlamaCppFileType(file_type).bind(tuned))
        result["file_types"][file_type] = report
        by_type = ", ".join(f"{t} {v['update_kept']:.2f}" for t, v in report["by_type"].items())
        print(f"{file_type}: pretrained weights on its grid {report['pretrained_on_grid']:.4f}; update kept "
              f"{report['update_kept']:.2f} ({by_type})")
    if args.out_json:
        write_json(args.out_json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
