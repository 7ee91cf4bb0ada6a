"""eval.py, analyze.py and the fake-quant validation of train.py score through one step (quant/scoring.py):
the same model, quantizer and windows give the same perplexity in all three."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from helpers import TINY_EVAL, compose, fill_lora_b, make_tiny_llama
from hydra.utils import instantiate
from peft import LoraConfig

from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.quant import RTN
from npft_lightning.quant.calibration import Calibration
from npft_lightning.quant.scoring import score_quantized
from npft_lightning.tasks.analyze import Analysis
from npft_lightning.tasks.build import build_quantizers, calibration_spec
from npft_lightning.tasks.evaluate import evaluate
from npft_lightning.training.callbacks import FakeQuantValidation
from npft_lightning.training.module import NPFTModule

# GPTQ runs the model on calibration windows, k-means gets the Fisher, ReQuant both (and takes gradients).
QUANT = ["rtn4", "gptq4", "kmeans3", "requant_rtn4"]
TINY = [*TINY_EVAL, "data.max_eval_windows=2", "calibration.windows=4", "calibration.length=64",
        "calibration.sensitivity_windows=2", f"quant=[{','.join(QUANT)}]",
        "quant.requant_rtn4.pqi_intervals=2"]


def composed(task: str, tmp_path: Path, *overrides: str):
    return compose(task, *TINY, f"paths.output_dir={tmp_path / task}", f"paths.cache_dir={tmp_path / 'cache'}", *overrides)


def trained_module(cfg) -> tuple[NPFTModule, object]:
    """The tiny model with LoRA adapters whose B is not zero (as after training), and its tokenizer."""
    model, tokenizer = instantiate(cfg.model).load()
    torch.manual_seed(0)  # LoRA's A
    module = NPFTModule(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], lora_dropout=0.0))
    return fill_lora_b(module), tokenizer


def test_eval_analyze_and_the_fake_quant_callback_score_alike(tmp_path):
    train_cfg = composed("train", tmp_path)
    module, tokenizer = trained_module(train_cfg)
    adapter = tmp_path / "adapter"
    module.model.save_pretrained(str(adapter))

    # train.py: the callback on the unmerged adapters, inside inference mode as in Lightning's validation.
    datamodule = instantiate(train_cfg.data, tokenizer=tokenizer)
    datamodule.setup("fit")
    callback = FakeQuantValidation(build_quantizers(train_cfg), calibration=calibration_spec(train_cfg))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.inference_mode():
        trained = callback._evaluate_all(types.SimpleNamespace(datamodule=datamodule), module)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())

    evaluated = evaluate(composed("eval", tmp_path, f"adapter={adapter}"))["ppl"]["validation"]
    analysis = Analysis(composed("analyze", tmp_path, f"adapter={adapter}", "perturb=none"))
    analysis.run()
    analyzed = {"fp": analysis.baselines["adapter"], **{r["quantizer"]: r["ppl"] for r in analysis.quant_rows}}

    assert set(trained) == set(evaluated) - {"_tokens", "_windows"} == set(analyzed) == {"fp", *QUANT}
    # eval.py and analyze.py hold the same merged model: every number agrees to the bit.
    assert analyzed == {k: evaluated[k] for k in analyzed}
    # The callback adds the adapters' updates to the weights itself (PEFT's merge in the others): the same sums, so
    # the same bits, where only the merged weights count.
    for name in ("rtn4", "gptq4"):
        assert trained[name] == evaluated[name], name
    # Where the adapters run unmerged, x·Wᵀ + x·(BA)ᵀ·s instead of x·(W + BA·s)ᵀ, equal up to rounding: the
    # unquantized PPL (a forward pass) and the Fisher (k-means, ReQuant's outlier search).
    for name in ("fp", "kmeans3", "requant_rtn4"):
        assert trained[name] == pytest.approx(evaluated[name], rel=1e-5), name
    assert len({round(v, 6) for v in trained.values()}) == len(trained)  # each quantizer changes the model


def test_the_calibration_hands_the_fisher_over_once_and_takes_it_back():
    """Several sensitivity-weighted quantizers of one pass share one Fisher; after the pass none holds it."""
    from npft_lightning.quant.nonuniform import KMeans

    model = make_tiny_llama()
    linears = decoder_linears(model)
    windows = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    calibration = Calibration(fisher_windows=windows)
    first, second = KMeans(3, iters=5, name="a"), KMeans(3, iters=5, name="b")
    seen = []

    def score() -> float:
        seen.append(first.sensitivity if first.sensitivity is not None else second.sensitivity)
        return perplexity(*dataset_nll(model, windows.split(1)))

    weights = {k: v.weight.detach().clone() for k, v in linears.items()}
    score_quantized(model, linears, first, score, calibration)
    score_quantized(model, linears, second, score, calibration)
    assert seen[0] is seen[1] is not None
    assert first.sensitivity is None and second.sensitivity is None
    assert all(torch.equal(weights[k], v.weight) for k, v in linears.items())
    with pytest.raises(ValueError, match="quantizer gptq4 runs the model on calibration windows"):
        from npft_lightning.quant.gptq import GPTQ

        score_quantized(model, linears, GPTQ(4, name="gptq4"), score, Calibration())
    assert score_quantized(model, linears, None, lambda: "as is", Calibration()) == "as is"
    assert score_quantized(model, linears, RTN(4), lambda: float(linears["model.layers.0.mlp.up_proj"].weight.detach().sum()),
                           Calibration()) != float(weights["model.layers.0.mlp.up_proj"].sum())
