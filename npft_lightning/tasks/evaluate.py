"""Score a model without training: unquantized and fake-quantized perplexity on one or more splits.

Behind ``eval.py``. The model may carry a PEFT adapter folder (merged before quantization); the
windows, the quantizers and the PPL definition are exactly those of the fake-quant validation
callback, so numbers from the two agree.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from npft_lightning.core import interrupt
from npft_lightning.core.errors import UserError
from npft_lightning.core.io import atomic_write_json
from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.lm.adapters import merge_adapter
from npft_lightning.quant.artefact import (
    load_quantized,
    quantized_size_report,
    save_quantized,
)
from npft_lightning.quant.calibration import Calibration
from npft_lightning.quant.scoring import score_quantized
from npft_lightning.tasks.build import build_quantizers, calibration_spec
from npft_lightning.tasks.checks import validate_against_model, window_lengths
from npft_lightning.tasks.checks_eval import splits_of
from npft_lightning.tasks.gguf_plan import plan_gguf_export, plan_llamacpp_files
from npft_lightning.tasks.llamacpp_files import (
    check_llamacpp_against_model,
    print_llamacpp_table,
    write_and_score_llamacpp_files,
)

log = logging.getLogger(__name__)


def load_for_eval(cfg: DictConfig, lengths: tuple[str, ...] = ("data.eval_seq_len",), key: str = "adapter") -> tuple[torch.nn.Module, Any]:
    """The model of ``cfg.model``, checked against the config (the window lengths ``lengths``, group sizes),
    with the adapter folder ``cfg.adapter`` (named ``key`` in messages) checked against it and merged in."""
    model, tokenizer = instantiate(cfg.model).load()
    validate_against_model(cfg, model, lengths)
    if cfg.get("adapter"):
        model = merge_adapter(model, key, cfg.adapter, cfg.model.name)
    return model.eval(), tokenizer


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    quantizers = {"fp": None, **build_quantizers(cfg)}
    gguf = plan_gguf_export(cfg, {name: q for name, q in quantizers.items() if q is not None})  # before the model loads
    llamacpp = plan_llamacpp_files(cfg)
    model, tokenizer = load_for_eval(cfg, window_lengths(quantizers.values()))
    device = torch.device(cfg.get("device") or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("validate")
    if llamacpp is not None:
        check_llamacpp_against_model(llamacpp, model, datamodule, cfg)
    # A train split too short to calibrate on stops here, not after scoring.
    calibration = Calibration.drawn(datamodule, calibration_spec(cfg), quantizers.values(), device)
    linears = decoder_linears(model)
    results: dict[str, dict[str, float]] = {}
    timings: dict[str, float] = {}
    exports: dict[str, dict[str, Any]] = {}
    ggufs: dict[str, dict[str, Any]] = {}
    # Effective bits per weight of every weight quantizer (dense codes + scales + sparse part, as stored),
    # and what a quantizer reports about its own run (ReQuant: detached counts per layer and step).
    bits: dict[str, dict[str, Any]] = {}
    reports: dict[str, Any] = {}
    config = OmegaConf.to_container(cfg, resolve=True)
    path = Path(cfg.paths.output_dir) / "metrics.json"
    windows = {split: datamodule.eval_windows(split) for split in splits_of(cfg)}
    for split, split_windows in windows.items():
        results[split] = {"_tokens": int(split_windows.numel()), "_windows": int(split_windows.size(0))}
    # Quantizer by quantizer, each scored on every split: a calibrated quantizer (GPTQ) runs once per model.
    for name, quantizer in quantizers.items():
        start = time.perf_counter()
        sizes: dict[str, Any] = {}

        def score_splits() -> None:  # called with the weights quantized
            if quantizer is not None:
                timings[f"quantize/{name}"] = time.perf_counter() - start
                if sizes:
                    bits[name] = sizes
                if getattr(quantizer, "last_report", None):
                    reports[name] = quantizer.last_report
                size = f", {sizes['bits_per_weight']:.3f} bits/weight" if sizes else ""
                if "gguf_bits_per_weight" in sizes:  # what a user compares: the linears' size in the GGUF file
                    size = f", {sizes['gguf_bits_per_weight']:.3f} bits/weight in a GGUF ({sizes['bits_per_weight']:.3f} packed)"
                tqdm.write(f"quantized with {name} ({timings[f'quantize/{name}']:.0f} s{size})")
            for split, split_windows in windows.items():
                split_start = time.perf_counter()
                batches = tqdm(split_windows.split(cfg.data.eval_batch_size), desc=f"{split} {name}", leave=False)
                nll, count = dataset_nll(model, batches, device)
                results[split][name] = perplexity(nll, count)
                timings[f"{split}/{name}"] = time.perf_counter() - split_start
                # Each result is on disk as soon as it exists: a long GPTQ sweep stopped half-way keeps what it measured.
                line = f"{split} {name}: PPL {results[split][name]:.4f} ({timings[f'{split}/{name}']:.0f} s)"
                log.info(line)
                tqdm.write(line)
                atomic_write_json(path, {"ppl": results, "bits": bits, "seconds": timings, "exports": exports,
                                         "quantizer_reports": reports, "complete": False, "config": config})
                interrupt.set_outcome(f"; the perplexities measured so far are in {path} (complete: false), run the "
                                      f"same command again for all of them")

        score_quantized(model, linears, quantizer, score_splits, calibration, sizes=sizes)
        if quantizer is not None and cfg.get("export_dir"):
            first = next(iter(windows))
            try:
                # Quantized again with what the scoring was handed (windows, Fisher): the same weights.
                with calibration.given_to(quantizer, model, linears) as calibration_windows:
                    exports[name] = export_and_check(model, linears, quantizer, Path(str(cfg.export_dir)).expanduser() / name,
                                                     calibration_windows, windows[first], cfg, device, tokenizer)
            except OSError as err:  # the folder was writable when the run started: a full disk, a lost mount
                raise UserError(f"export_dir={cfg.export_dir}: writing {name} failed ({err.strerror or err}); the perplexities "
                                f"measured so far are in {path}") from err
        if quantizer is not None and gguf is not None:
            first = next(iter(windows))
            try:
                ggufs[name] = gguf_export_and_score(model, tokenizer, quantizer, gguf, windows[first], results[first][name], cfg)
            except OSError as err:  # writable when the run started: a full disk, a lost mount
                raise UserError(f"gguf_out={cfg.gguf_out}: writing {name} failed ({err.strerror or err}); the perplexities "
                                f"measured so far are in {path}") from err
    metrics = {"ppl": results, "bits": bits, "seconds": timings, "exports": exports, "quantizer_reports": reports,
               "complete": True, "config": config}
    if ggufs:
        metrics["gguf"] = ggufs
    if llamacpp is not None:  # llama.cpp's own quantizer, each file scored by llama.cpp on every split
        metrics["llamacpp"] = write_and_score_llamacpp_files(model, tokenizer, datamodule, llamacpp, windows, cfg)
    atomic_write_json(path, metrics)
    print_eval_table(results, bits)
    if llamacpp is not None:
        print_llamacpp_table(metrics["llamacpp"])
    return metrics


def export_and_check(model, linears, quantizer, path: Path, calibration, windows, cfg: DictConfig, device,
                     tokenizer=None) -> dict[str, Any]:
    """Write the real quantized artefact (with the tokenizer, so the folder loads on its own), load it back, and
    score it on the same windows.

    The reloaded PPL must equal the fake-quant PPL exactly (same decoded weights).
    """
    save_quantized(model, linears, quantizer, path, calibration=calibration, tokenizer=tokenizer)
    reloaded = load_quantized(path).to(device)
    nll, count = dataset_nll(reloaded, tqdm(windows.split(cfg.data.eval_batch_size), desc=f"reloaded {quantizer.name}", leave=False), device)
    del reloaded
    report = quantized_size_report(path)
    report["ppl_reloaded"] = perplexity(nll, count)
    report["path"] = str(path)
    print(f"exported {quantizer.name} to {path}: reloaded PPL {report['ppl_reloaded']:.4f}; " + ", ".join(
        f"{k}={v:.4g}" for k, v in report.items() if isinstance(v, float) and "ratio" in k))
    return report


def gguf_export_and_score(model, tokenizer, quantizer, plan, windows, fake_quant_ppl: float, cfg: DictConfig) -> dict[str, Any]:
    """Write ``quantizer``'s GGUF of the merged model and, with ``llamacpp_ppl``, score it with llama.cpp on ``windows``."""
    from npft_lightning.quant.gguf_export import write_gguf

    path = plan.paths[quantizer.name]
    report = write_gguf(model, tokenizer, quantizer, path, plan.vocab)
    print(f"wrote {quantizer.name} GGUF to {path} ({report['bytes'] / 2**20:.1f} MiB)")
    if cfg.get("llamacpp_ppl"):
        from npft_lightning.quant.llamacpp import llamacpp_perplexity

        scores = llamacpp_perplexity(path, windows, n_threads=cfg.get("llamacpp_threads"))
        report.update(scores, ppl_fake_quant=fake_quant_ppl, ppl_ratio=scores["ppl"] / fake_quant_ppl)
        print(f"llama.cpp {quantizer.name}: PPL {scores['ppl']:.4f} (all tokens; fake-quant {fake_quant_ppl:.4f}, "
              f"ratio {report['ppl_ratio']:.4f}), {scores['ppl_second_half']:.4f} (second half of each window, "
              f"llama.cpp's perplexity tool), {scores['tokens_per_s']:.0f} tokens/s")
    return report


def print_eval_table(results: dict[str, dict[str, float]], bits: dict[str, dict[str, Any]] | None = None) -> None:
    """PPL per split and quantizer, and a last row with each quantizer's effective bits per weight (decoder linears)."""
    table = Table(title="Perplexity (GPTQ protocol)")
    table.add_column("split")
    names = [n for n in next(iter(results.values())) if not n.startswith("_")]
    for name in names:
        table.add_column("unquantized" if name == "fp" else name, justify="right")
    table.add_column("windows × tokens", justify="right")
    for split, row in results.items():
        table.add_row(split, *[f"{row[n]:.3f}" for n in names], f"{row['_windows']} × {row['_tokens'] // max(row['_windows'], 1)}")
    if bits:
        table.add_row("bits/weight", *[f"{bits[n]['bits_per_weight']:.3f}" if n in bits else "—" for n in names], "")
        if any("gguf_bits_per_weight" in b for b in bits.values()):  # a ggml type's linears in a GGUF file
            table.add_row("GGUF bits/weight", *[f"{bits[n]['gguf_bits_per_weight']:.3f}" if "gguf_bits_per_weight" in bits.get(n, {})
                                                else "—" for n in names], "")
    Console().print(table)
