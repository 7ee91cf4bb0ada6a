"""eval.py's ``llamacpp_types``: llama.cpp's own quantizer on the merged model, each file scored by llama.cpp.

    python eval.py llamacpp_types=[Q4_0,Q4_K_M,IQ4_XS] imatrix=both gguf_out=out/smollm2.gguf

The merged model is written as a float GGUF (``<stem>-F32.gguf``); with ``imatrix``, an importance matrix
is computed on the calibration windows of the train split (``<stem>.imatrix.gguf``, for
``llama-quantize --imatrix`` too), or read from the file ``imatrix`` names (a training run's
``<run>/imatrix.gguf``: the matrix its target was weighted by); each file type is quantized from the float file by
``llama_model_quantize`` (``<stem>-<TYPE>.gguf``, ``<stem>-<TYPE>-imatrix.gguf``); every file, the float
one included, is scored by llama.cpp's forward on the windows of every split (the float file, the imatrix and
the quantization are made once for all of them), with its bits per weight (whole file and decoder linears)
and llama.cpp's tokens per second.
"""

from __future__ import annotations

import time
from typing import Any

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import decoder_linears
from npft_lightning.lm.models import max_context
from npft_lightning.quant.gguf_export import (
    gguf_hparams,
    gguf_linear_names,
    gguf_size_report,
    write_gguf,
)
from npft_lightning.quant.imatrix import (
    check_imatrix_fits,
    collect_imatrix,
    read_imatrix,
    write_imatrix,
)
from npft_lightning.quant.importance import gguf_weight_name
from npft_lightning.quant.llamacpp import llamacpp_perplexity
from npft_lightning.quant.llamacpp_quantize import check_columns, quantize_gguf
from npft_lightning.tasks.gguf_plan import LlamaCppPlan


def check_llamacpp_against_model(plan: LlamaCppPlan, model, datamodule, cfg: DictConfig) -> None:
    """Right after the model loads, before anything is scored: what the export cannot write, a layer llama.cpp would
    leave unquantized, the calibration windows of the imatrix; one line per fallback llama.cpp will make."""
    gguf_hparams(model.config)
    columns = {lin.in_features for lin in decoder_linears(model).values()}
    for name in plan.types:
        note = check_columns(name, columns)
        if note:
            print(note)
    if plan.imatrix_given:  # a file computed for another model stops here
        in_features = {gguf_weight_name(name): linear.in_features for name, linear in decoder_linears(model).items()}
        check_imatrix_fits(read_imatrix(plan.imatrix_path), in_features, f"imatrix={plan.imatrix_path}")
    elif plan.imatrix_path is not None:
        length, context = cfg.calibration.length, max_context(model)
        if context and length > context:
            raise UserError(f"calibration.length={length} (the imatrix windows) is longer than the model's context of "
                            f"{context} tokens; use calibration.length<={context}")
        datamodule.calibration_windows(0, length)  # a train split too short for one window stops here


def label(name: str, with_imatrix: bool) -> str:
    return f"{name}+imatrix" if with_imatrix else name


def write_and_score_llamacpp_files(model, tokenizer, datamodule, plan: LlamaCppPlan, windows: dict[str, Any],
                                   cfg: DictConfig) -> dict[str, Any]:
    """Write the float GGUF, the imatrix and every planned file; score each with llama.cpp on the windows of
    every split (``windows``: split -> token ids [n, L]).

    Returns file label (``F32``, ``Q4_K_M``, ``Q4_K_M+imatrix``, ...) -> its size report and llama.cpp scores
    (those of the first split at the top, as when only one split was scored; every split's under ``splits``),
    and ``imatrix`` -> where the importance matrix went and what it was computed on.
    """
    threads = cfg.get("llamacpp_threads")
    reports: dict[str, Any] = {}

    def score(key: str, report: dict[str, Any]) -> None:
        report["splits"] = {split: llamacpp_perplexity(report["path"], split_windows, n_threads=threads)
                            for split, split_windows in windows.items()}
        report.update(next(iter(report["splits"].values())))
        reports[key] = report
        scores = ", ".join(f"{split} PPL {s['ppl']:.4f} (second half {s['ppl_second_half']:.4f})" for split, s in report["splits"].items())
        print(f"llama.cpp {key}: {scores}, {report['bits_per_weight']:.3f} bits/weight ({report['bits_per_weight_linears']:.3f} "
              f"decoder linears), {report['bytes'] / 2**20:.1f} MiB, {report['tokens_per_s']:.0f} tokens/s, {report['path']}")

    write_gguf(model, tokenizer, plan.float_type, plan.float_path, plan.vocab)
    score(plan.float_type.upper(), gguf_size_report(plan.float_path))
    imatrix = None
    if plan.imatrix_given:
        imatrix = read_imatrix(plan.imatrix_path)
        dataset = ", ".join(imatrix.datasets) or "no dataset recorded"
        reports["imatrix"] = {"path": str(plan.imatrix_path), "dataset": dataset, "entries": len(imatrix.sums), "given": True}
        print(f"importance matrix of {len(imatrix.sums)} tensors read from {plan.imatrix_path} ({dataset})")
    elif plan.imatrix_path is not None:
        calibration = cfg.calibration
        start = time.perf_counter()
        calib = datamodule.calibration_windows(calibration.windows, calibration.length, seed=calibration.seed)
        dataset = (f"{datamodule.corpus.name} train split: {calibration.windows} windows of {calibration.length} tokens, "
                   f"seed {calibration.seed}")
        imatrix = collect_imatrix(model, calib.split(cfg.data.eval_batch_size), gguf_linear_names(model), dataset)
        write_imatrix(imatrix, plan.imatrix_path)
        reports["imatrix"] = {"path": str(plan.imatrix_path), "dataset": dataset, "entries": len(imatrix.sums),
                              "seconds": time.perf_counter() - start}
        print(f"importance matrix of {len(imatrix.sums)} decoder linears on {dataset}: {plan.imatrix_path}")
    for name, with_imatrix, path in plan.files:
        start = time.perf_counter()
        report = quantize_gguf(plan.float_path, path, name, imatrix if with_imatrix else None,
                               plan.imatrix_path if with_imatrix else None, threads=threads)
        report["quantize_seconds"] = time.perf_counter() - start
        score(label(name, with_imatrix), report)
    return reports


def print_llamacpp_table(reports: dict[str, Any]) -> None:
    """Per split, one row per llama.cpp file: its PPL (both conventions), bits per weight (whole file, decoder
    linears), size, speed."""
    files = {key: r for key, r in reports.items() if key != "imatrix"}
    for split in next(iter(files.values()))["splits"]:
        table = Table(title=f"llama.cpp files scored by llama.cpp ({split}): PPL of every token and of each window's second "
                            f"half, bits per weight of the file and of the decoder linears")
        table.add_column("file", no_wrap=True)
        for column in ("PPL", "2nd half", "bits/w", "linears", "MiB", "tok/s"):  # short: an 80-column log keeps them whole
            table.add_column(column, justify="right")
        for key, r in files.items():
            s = r["splits"][split]
            table.add_row(key, f"{s['ppl']:.3f}", f"{s['ppl_second_half']:.3f}", f"{r['bits_per_weight']:.3f}",
                          f"{r['bits_per_weight_linears']:.3f}", f"{r['bytes'] / 2**20:.1f}", f"{s['tokens_per_s']:.0f}")
        Console().print(table)
