"""Peak resident memory of a short training run and of an evaluation, per model: does the vocabulary's logits
tensor (Gemma 3: 262 144 tokens) fit the machine at the default windows?

Each command runs as a child process, one at a time; its peak RSS is that child's ru_maxrss (bench/cost.py's
child_peak_rss). The logits sizes beside them are computed from the composed config (batch x seq x vocab x 4 bytes).

    python bench/logits_memory.py                                     # gemma3-270m and smollm2-135m, train and eval
    python bench/logits_memory.py --models gemma3-270m --tasks eval   # one cell, merged into the --out file
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

from common import ROOT, load_config, machine, write_json
from cost import child_peak_rss, out_path

TASKS = ["train", "eval"]


def commands(model: str, out: str) -> dict[str, list[str]]:
    """The two measured commands: 2 training steps of the default recipe (curvature probe off) and eval.py on 2 windows."""
    return {
        "train": [sys.executable, "train.py", f"model={model}", "trainer.max_steps=2", "data.max_eval_windows=1",
                  "curvature=null", "print_config=false", f"hydra.run.dir={out}/train"],
        "eval": [sys.executable, "eval.py", f"model={model}", "data.max_eval_windows=2", "print_config=false",
                 f"hydra.run.dir={out}/eval"],
    }


def logits_bytes(model: str) -> dict[str, int]:
    """fp32 logits of one training batch and of one evaluation batch, from the composed config and the model's vocab."""
    from hydra.utils import instantiate
    from transformers import AutoConfig

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config([f"model={model}"], tmp)
    spec = instantiate(cfg.model)  # a GGUF model's converted folder, or model.path
    vocab = AutoConfig.from_pretrained(spec.path or spec.cache_root / "models" / spec.name).vocab_size
    data = cfg.data
    return {"vocab_size": vocab, "train_batch": data.batch_size, "train_seq_len": data.seq_len,
            "eval_batch": data.eval_batch_size, "eval_seq_len": data.eval_seq_len,
            "train_logits_bytes": data.batch_size * data.seq_len * vocab * 4,
            "eval_logits_bytes": data.eval_batch_size * data.eval_seq_len * vocab * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["gemma3-270m", "smollm2-135m"])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=TASKS)
    parser.add_argument("--out", default="docs/bench/memory_gemma3.json")
    args = parser.parse_args()

    out = out_path(args.out)
    result: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {}
    result["bench"] = "logits_memory"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for model in args.models:
        row = result.setdefault("models", {}).setdefault(model, {})
        row.update(logits_bytes(model))
        for task in args.tasks:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = commands(model, tmp)[task]
                print(f"{model} {task}: {' '.join(cmd[1:])}", flush=True)
                measured = child_peak_rss(cmd, env)
            measured["command"] = "python " + " ".join(cmd[1:-1])  # without the temporary run dir
            row[task] = {**measured, "machine": machine()}
            print(f"  peak RSS {measured['peak_rss_bytes'] / 2**30:.2f} GiB in {measured['wall_s']:.0f} s", flush=True)
            write_json(out, result)


if __name__ == "__main__":
    main()
