"""llama.cpp scores our GGUF exports (the optional ``llamacpp`` extra: ``make llamacpp``).

Skipped only when the extra is not installed. Installed but broken (does not import, crashes, gives other
numbers) fails: llama.cpp first runs in a subprocess, so a crashing build fails these tests instead of
killing the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_peaked_llama

from npft_lightning.core.layers import decoder_linears
from npft_lightning.core.perplexity import causal_lm_nll, dataset_nll, perplexity
from npft_lightning.lm.models import ByteTokenizer
from npft_lightning.quant import fake_quantized
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.gguf_export import BYTES, write_gguf
from npft_lightning.quant.llamacpp import llama_cpp_installed, window_nll
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType, twin

ROOT = Path(__file__).resolve().parents[1]
needs_extra = pytest.mark.skipif(not llama_cpp_installed(), reason="the llamacpp extra is not installed (make llamacpp)")


def test_window_nll_conventions() -> None:
    """All L - 1 predictions (our GPTQ protocol), and llama.cpp's perplexity tool's second half: the predictions
    of tokens L/2 + 1 .. L - 1."""
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    total, count, half, half_count = window_nll(logits, tokens, 8)
    nll, n = causal_lm_nll(logits[None], tokens[None])
    assert count == n == 15 and total == pytest.approx(nll.item(), rel=1e-6)
    per_token = torch.nn.functional.cross_entropy(logits[8:-1], tokens[9:], reduction="sum")
    assert half_count == 7 and half == pytest.approx(per_token.item(), rel=1e-6)


def test_missing_extra_is_one_line(monkeypatch) -> None:
    from importlib import metadata

    from npft_lightning.core.errors import UserError
    from npft_lightning.quant.llamacpp import require_llama_cpp

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(UserError, match=r"needs the llamacpp extra: make llamacpp"):
        require_llama_cpp()


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """Tiny GGUFs in Q8_0 and Q4_0, checked to load and run in a separate llama.cpp process first."""
    folder = tmp_path_factory.mktemp("gguf")
    model = make_peaked_llama()
    paths = {}
    for qtype in ("q8_0", "q4_0"):
        paths[qtype] = folder / f"tiny-{qtype}.gguf"
        write_gguf(model, ByteTokenizer(), GGMLQuantizer(qtype), paths[qtype], BYTES)
    code = ("import llama_cpp, sys; llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, logits_all=True, "
            "verbose=False, n_threads=1); llm.eval(list(range(64))); assert llm.scores[:64].shape == (64, 256); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(paths["q4_0"])], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or "ok" not in proc.stdout:
        pytest.fail(f"the llamacpp extra is installed but llama.cpp does not run a GGUF (exit code {proc.returncode}); "
                    f"rebuild it with make llamacpp: {proc.stderr[-2000:]}")
    return paths


@needs_extra
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_llama_cpp_matches_our_fake_quant(qtype: str, exported: dict[str, Path]) -> None:
    from npft_lightning.quant.llamacpp import llamacpp_perplexity

    model = make_peaked_llama()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 256, (3, 128), generator=g)
    with torch.no_grad(), fake_quantized(model, decoder_linears(model), GGMLQuantizer(qtype)):
        ours = perplexity(*dataset_nll(model, windows.split(1)))
        logits = model(input_ids=windows[:1]).logits[0]
    scores = llamacpp_perplexity(exported[qtype], windows, n_threads=1)
    assert scores["tokens"] == 3 * 127 and scores["tokens_second_half"] == 3 * 63 and scores["windows"] == 3
    assert scores["ppl"] == pytest.approx(ours, rel=0.01)
    assert scores["tokens_per_s"] > 0

    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(exported[qtype]), n_ctx=128, n_batch=128, logits_all=True, verbose=False, n_threads=1)
    llm.eval(windows[0].tolist())
    theirs = torch.from_numpy(llm.scores[:128].copy())
    llm.close()
    # llama.cpp rounds the activations to Q8_0 (and the KV cache to F16); nothing else differs. (Without the Q/K
    # permutation the logits differ by ~90 % of their largest value and a quarter of the argmaxes agree.)
    assert (theirs - logits).abs().max() < 0.05 * logits.abs().max()
    assert (theirs.argmax(-1) == logits.argmax(-1)).float().mean() > 0.9


@needs_extra
@pytest.mark.parametrize("name", ["Q4_K_M", "iq4_xs", *(pytest.param(n, marks=pytest.mark.slow) for n in ("q4_k", "q6_k", "Q3_K_M"))])
def test_llama_cpp_scores_k_quants_as_our_fake_quant(name: str, exported: dict[str, Path], tmp_path: Path) -> None:
    """K-quant, IQ4 and file-type GGUFs load in llama.cpp and score the fake-quant PPL (llama.cpp rounds the
    activations to Q8_K for the K-quants' dot products: within 1 %)."""
    from npft_lightning.quant.llamacpp import llamacpp_perplexity

    model = make_peaked_llama(256, 256, scale=3)
    quantizer = LlamaCppFileType(name) if name.isupper() else twin(name)
    path = tmp_path / f"tiny-{name}.gguf"
    report = write_gguf(model, ByteTokenizer(), quantizer, path, BYTES)
    if name.islower():  # one type (a file type: several, see test_llamacpp_quantize)
        assert report["tensor_types"][name.upper()] == 14
    windows = torch.randint(0, 256, (3, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fake_quantized(model, decoder_linears(model), quantizer):
        ours = perplexity(*dataset_nll(model, windows.split(1)))
    assert llamacpp_perplexity(path, windows, n_threads=1)["ppl"] == pytest.approx(ours, rel=0.01)


@needs_extra
def test_eval_scores_the_gguf_with_llama_cpp(tmp_path: Path, exported: dict[str, Path]) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "eval.py"), f"hydra.run.dir={tmp_path}", "model=tiny-llama", "data.eval_seq_len=128",
           "data.max_eval_windows=2", "print_config=false", "quant=[q8_0,llamacpp_q4_k_m]",
           f"gguf_out={tmp_path / 'tiny.gguf'}", "llamacpp_ppl=true", "llamacpp_threads=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for name in ("q8_0", "llamacpp_q4_k_m"):
        report = metrics["gguf"][name]
        assert report["path"] == str(tmp_path / f"tiny-{name}.gguf")
        assert report["ppl_fake_quant"] == metrics["ppl"]["validation"][name]
        assert report["ppl_ratio"] == pytest.approx(1.0, abs=0.01)
        assert report["tokens"] == 2 * 127 and report["ppl_second_half"] > 1
        assert f"llama.cpp {name}: PPL" in proc.stdout
    # tiny-llama's rows of 64 / 128: Q4_K_M's fallbacks, as llama.cpp writes them
    types = metrics["gguf"]["llamacpp_q4_k_m"]["tensor_types"]
    assert (types["Q5_0"], types["Q8_0"]) == (12, 2)
