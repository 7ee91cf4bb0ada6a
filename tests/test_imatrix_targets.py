"""Recipes trained for the file a user ships: the Q4_0 / Q4_K_M recipes, and ``imatrix`` (the training target and the
fake-quant validation weighted by an importance matrix, as ``llama-quantize --imatrix`` weights the file).

At a perturbed step of a real Lightning fit the forward reads Q_imatrix(W + ΔW) − ΔW, with Q_imatrix the file type's
quantizer ``.with_importance`` the imatrix computed here by hand on the same calibration windows of the pretrained
model; the matrix is written to the run folder and a resumed run takes it from the checkpoint instead of computing it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    ForwardProbe,
    make_datamodule,
    make_module,
    make_tiny_llama,
    make_trainer,
)
from hydra import compose, initialize_config_dir

from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.noise import QuantErrorNoise
from npft_lightning.npft.outliers import OutlierSelector
from npft_lightning.quant.calibration import CalibrationSpec
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.imatrix import collect_imatrix, read_imatrix
from npft_lightning.quant.importance import gguf_weight_name
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType
from npft_lightning.tasks.checks import validate_config
from npft_lightning.training.callbacks import (
    FakeQuantValidation,
    ImportanceWeighting,
    NoisePerturbation,
    OutlierSelection,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny-llama", "data.seq_len=64", "data.eval_seq_len=128", "data.max_eval_windows=1", "calibration.windows=4",
        "calibration.length=64", "curvature=null", "print_config=false", "trainer.enable_progress_bar=false",
        "callbacks.rich_progress_bar=null"]
# experiment -> (the target's type and file type or ggml type, share of perturbed steps, imatrix)
RECIPES = {
    "mixed_q4_k": (LlamaCppFileType, "Q4_K_M", 0.15, None),
    "qat_q4_k": (LlamaCppFileType, "Q4_K_M", 1.0, None),
    "mixed_q4_k_imatrix": (LlamaCppFileType, "Q4_K_M", 0.15, "calibration"),
    "qat_q4_0": (GGMLQuantizer, "q4_0", 1.0, None),
    "mixed_q4_0_imatrix": (LlamaCppFileType, "Q4_0", 0.15, "calibration"),
    "qat_q4_0_imatrix": (LlamaCppFileType, "Q4_0", 1.0, "calibration"),
    "qat_q4_k_imatrix": (LlamaCppFileType, "Q4_K_M", 1.0, "calibration"),
    "qat75_q4_k_imatrix": (LlamaCppFileType, "Q4_K_M", 0.75, "calibration"),
}


def compose_train(overrides: list[str], output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"paths.output_dir={output_dir}"])


@pytest.mark.parametrize("experiment", RECIPES)
def test_recipe_configs_compose_and_build(experiment: str, tmp_path: Path) -> None:
    from npft_lightning.tasks.train import build

    kind, grid, step_probability, imatrix = RECIPES[experiment]
    cfg = compose_train([f"experiment={experiment}", *TINY], tmp_path)
    validate_config(cfg, "train")
    assert cfg.task_name == experiment and cfg.imatrix == imatrix
    module, datamodule, trainer, npft = build(cfg)
    noise, fake_quant = npft["noise"], npft["fake_quant"]
    target = noise.distribution.quantizer
    assert isinstance(target, kind) and getattr(target, "file_type", getattr(target, "qtype", None)) == grid
    assert noise.step_probability == step_probability and isinstance(noise.distribution, QuantErrorNoise)
    (validation,) = fake_quant.quantizers.values()  # validated in the type it trains for
    assert type(validation) is kind and vars(validation) == vars(target) and validation is not target
    if imatrix is None:
        assert "imatrix" not in npft
    else:  # both weighted; the matrix comes first, before the fake-quant score of the model before training
        weighting = npft["imatrix"]
        assert weighting.quantizers == [target, validation] and weighting.imatrix is None
        order = [type(c) for c in trainer.callbacks]
        assert order.index(ImportanceWeighting) < min(order.index(OutlierSelection), order.index(FakeQuantValidation))


def hand_imatrix(dm, spec: CalibrationSpec) -> dict[str, torch.Tensor]:
    """The importance matrix of the pretrained tiny llama on the calibration windows, by collect_imatrix directly."""
    model = make_tiny_llama()
    names = {name: gguf_weight_name(name) for name in decoder_linears(model)}
    windows = dm.calibration_windows(spec.windows, spec.length, seed=spec.seed)
    return collect_imatrix(model, windows.split(2), names).means()


def test_a_perturbed_step_sees_the_imatrix_weighted_error_of_the_merged_weight(tmp_path: Path) -> None:
    spec = CalibrationSpec(windows=4, length=32, seed=3, sensitivity_windows=1)
    module, dm = make_module(), make_datamodule()
    clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    target, validation = LlamaCppFileType("Q4_K_M"), LlamaCppFileType("Q4_K_M")
    weighting = ImportanceWeighting([target, validation], tmp_path, calibration=spec, batch_size=2)
    noise = NoisePerturbation(QuantErrorNoise(target), seed=5, step_probability=1.0)
    probe = ForwardProbe()
    trainer = make_trainer([weighting, OutlierSelection(OutlierSelector(method="all")), noise,
                            FakeQuantValidation({"q4_k_m": validation}, before_fit=False), probe], steps=2)
    trainer.fit(module, datamodule=dm)

    means = hand_imatrix(dm, spec)
    weighted = LlamaCppFileType("Q4_K_M").with_importance(means).bind(decoder_linears(make_tiny_llama()))
    plain = LlamaCppFileType("Q4_K_M").bind(decoder_linears(make_tiny_llama()))
    assert weighting.imatrix.means().keys() == means.keys()
    assert all(torch.equal(weighting.imatrix.means()[k], means[k]) for k in means)
    differs = False
    for step in (0, 1):
        for name, w in clean.items():
            merged = w + probe.deltas[step][name]
            expected = w + (weighted.quantize_weight(merged, name=name) - merged)  # W + δ, δ = Q(W') − W'
            assert torch.equal(probe.seen[step][name], expected), (step, name)
            differs |= not torch.equal(expected, w + (plain.quantize_weight(merged, name=name) - merged))
    assert differs  # the unweighted target is another error: the check above can fail
    for quantizer in (target, validation):  # the validation is weighted by the same matrix
        assert quantizer.has_importance and all(torch.equal(quantizer.importance_of(n, len(v)), v) for n, v in means.items())
    saved = read_imatrix(tmp_path / "imatrix.gguf").means()
    assert saved.keys() == means.keys() and all(torch.equal(saved[k], means[k]) for k in means)


def test_the_imatrix_is_saved_in_the_run_folder_and_reused_on_resume(tmp_path: Path, monkeypatch) -> None:
    import npft_lightning.training.callbacks as callbacks
    from npft_lightning.tasks.train import train

    run = [*TINY, "experiment=mixed_q4_k_imatrix", "trainer.max_steps=2", "callbacks.model_checkpoint.every_n_train_steps=1",
           "callbacks.model_checkpoint.save_top_k=-1", "data.max_train_windows=8"]
    first = train(compose_train(run, tmp_path / "first"))
    assert first["imatrix"]["source"] == "calibration" and first["imatrix"]["path"] == str(tmp_path / "first" / "imatrix.gguf")
    written = read_imatrix(tmp_path / "first" / "imatrix.gguf")
    assert (written.chunks, written.chunk_size, len(written.sums)) == (4, 64, 14)

    def no_second_time(*args, **kwargs):
        raise AssertionError("a resumed run computed the imatrix again")

    monkeypatch.setattr(callbacks, "collect_imatrix", no_second_time)
    # Other calibration windows: a matrix computed now would differ from the checkpoint's.
    resumed = train(compose_train([*run, "trainer.max_steps=3", "calibration.seed=1",
                                   f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'step_000001.ckpt'}"], tmp_path / "resumed"))
    assert resumed["train"]["global_step"] == 3
    again = read_imatrix(tmp_path / "resumed" / "imatrix.gguf")
    assert again.counts == written.counts and all(torch.equal(again.sums[k], written.sums[k]) for k in written.sums)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["imatrix"]["datasets"] == written.datasets


def test_an_imatrix_file_weights_the_targets_as_given(tmp_path: Path) -> None:
    """imatrix=<file>: the file's means, read by the training task, reach the quantizers unchanged."""
    from npft_lightning.quant.imatrix import ImportanceMatrix, write_imatrix
    from npft_lightning.tasks.train import build_callbacks

    linears = decoder_linears(make_tiny_llama())
    g = torch.Generator().manual_seed(0)
    sums = {gguf_weight_name(n): torch.rand(l.in_features, generator=g, dtype=torch.float64) for n, l in linears.items()}
    path = write_imatrix(ImportanceMatrix(sums, dict.fromkeys(sums, 7), 64, 2, ["by hand"]), tmp_path / "given.imatrix.gguf")
    cfg = compose_train([*TINY, "experiment=mixed_q4_k", f"imatrix={path}"], tmp_path / "run")
    validate_config(cfg, "train")
    from npft_lightning.tasks.build import build_quantizers

    _, npft = build_callbacks(cfg, build_quantizers(cfg))
    weighting = npft["imatrix"]
    assert weighting.source == str(path) and weighting.imatrix.datasets == ["by hand"]
    weighting.on_train_start(type("T", (), {"is_global_zero": True})(), None)
    given = read_imatrix(path).means()  # the file holds float32 sums
    assert len(weighting.quantizers) == 2
    for quantizer in weighting.quantizers:
        for name, linear in linears.items():
            expected = given[gguf_weight_name(name)]
            assert torch.equal(expected, (sums[gguf_weight_name(name)].float().double() / 7).float())
            assert torch.equal(quantizer.importance_of(name, linear.in_features), expected)
    assert read_imatrix(tmp_path / "run" / "imatrix.gguf").sums.keys() == sums.keys()


@pytest.mark.skipif(not __import__("npft_lightning.quant.llamacpp", fromlist=["x"]).llama_cpp_installed(),
                    reason="the llamacpp extra is not installed (make llamacpp)")
def test_the_export_with_the_runs_imatrix_is_the_file_the_run_trained_for(tmp_path: Path) -> None:
    """train.py experiment=mixed_q4_k_imatrix, then eval.py llamacpp_types=[Q4_K_M] imatrix=<run>/imatrix.gguf: every
    decoder tensor of llama.cpp's file is the run's target quantizer (weighted by the run's matrix) applied to the
    merged weight, bit for bit. Widths 256 / 512: Q4_K and Q6_K themselves, no fallback."""
    import os
    import subprocess
    import sys

    from hydra.utils import instantiate
    from peft import PeftModel

    from npft_lightning.quant.gguf_export import permute_rows, read_gguf_weights
    from npft_lightning.tasks.train import train

    wide = ["model.tiny.hidden_size=256", "model.tiny.intermediate_size=512"]
    run = tmp_path / "run"
    train(compose_train([*TINY, *wide, "experiment=mixed_q4_k_imatrix", "trainer.max_steps=2", "noise.step_probability=1.0",
                         "data.max_train_windows=4"], run))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "eval.py"), f"hydra.run.dir={tmp_path / 'eval'}", "model=tiny-llama", *wide,
           "data.eval_seq_len=128", "data.max_eval_windows=1", "print_config=false", "quant=none", f"adapter={run / 'adapter'}",
           "llamacpp_types=[Q4_K_M]", f"imatrix={run / 'imatrix.gguf'}", f"gguf_out={tmp_path / 'm.gguf'}", "llamacpp_threads=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())["llamacpp"]
    assert report["imatrix"]["given"] and set(report) == {"F32", "imatrix", "Q4_K_M+imatrix"}

    cfg = compose_train([*TINY, *wide], tmp_path / "scratch")
    base, _ = instantiate(cfg.model).load()
    merged = PeftModel.from_pretrained(base, str(run / "adapter")).merge_and_unload()
    linears = decoder_linears(merged)
    target = LlamaCppFileType("Q4_K_M").with_importance(read_imatrix(run / "imatrix.gguf").means()).bind(linears)
    assert {"q4_k", "q6_k"} <= set(target.types.values())
    written = read_gguf_weights(tmp_path / "m-Q4_K_M-imatrix.gguf")
    heads = {"q_proj": merged.config.num_attention_heads, "k_proj": merged.config.num_key_value_heads}
    for name, linear in linears.items():
        expected = target.quantize_weight(linear.weight.detach(), name=name)
        leaf = name.rsplit(".", 1)[-1]
        if leaf in heads:  # the GGUF holds q / k with llama.cpp's row order; rows are quantized one by one
            expected = permute_rows(expected, heads[leaf])
        assert torch.equal(written[gguf_weight_name(name)], expected), name
