"""llama.cpp's own quantizer on our float GGUF export (the optional ``llamacpp`` extra: ``make llamacpp``).

The checks of file types and fallbacks always run; the rest is skipped only when the extra is not
installed, like tests/test_llamacpp.py. Installed but broken fails: llama.cpp first quantizes and runs a
file in a subprocess, so a crashing build fails these tests instead of killing the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from helpers import make_peaked_llama
from transformers import LlamaForCausalLM

from npft_lightning.core.errors import UserError
from npft_lightning.core.perplexity import dataset_nll, perplexity
from npft_lightning.lm.models import ByteTokenizer
from npft_lightning.quant.gguf_export import (
    BYTES,
    gguf_linear_names,
    read_gguf_weights,
    write_gguf,
)
from npft_lightning.quant.imatrix import ImportanceMatrix, collect_imatrix
from npft_lightning.quant.llamacpp import llama_cpp_installed
from npft_lightning.quant.llamacpp_filetype import FILE_TYPES as TWIN_FILE_TYPES
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType
from npft_lightning.quant.llamacpp_quantize import (
    FILE_TYPES,
    check_columns,
    fallbacks,
    file_type,
    quantize_gguf,
)

ROOT = Path(__file__).resolve().parents[1]
needs_extra = pytest.mark.skipif(not llama_cpp_installed(), reason="the llamacpp extra is not installed (make llamacpp)")


# ---------------------------------------------------------------------------------------------
# file types and fallbacks (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------


def test_file_types() -> None:
    assert file_type("q4_k_m") is FILE_TYPES["Q4_K_M"] and FILE_TYPES["Q4_K_M"].ftype == 15
    # Read off llama.cpp's rules (llamacpp_rules.tensor_types), the twins' plan: the types llama_tensor_get_type gives
    # a dense llama model's decoder linears.
    assert FILE_TYPES["Q4_K_M"].linear_types == ("Q4_K", "Q6_K")
    assert FILE_TYPES["Q2_K"].linear_types == ("Q2_K", "Q3_K", "Q4_K")  # attn_v Q4_K from grouped-query ratio 4 on
    assert FILE_TYPES["IQ4_XS"].linear_types == ("IQ4_XS", "Q5_K")
    assert FILE_TYPES["Q4_0"].linear_types == ("Q4_0", "Q4_1")  # ffn_down of the first eighth, with an imatrix
    assert set(TWIN_FILE_TYPES) == set(FILE_TYPES) - {"Q2_K"}  # every type but Q2_K has a fake-quant twin
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS"):
        assert name in FILE_TYPES
    with pytest.raises(UserError, match=r"llamacpp_types: 'Q4_K_X' is not a llama.cpp file type .*choose from Q4_0, Q4_1"):
        file_type("Q4_K_X")


def test_fallbacks_follow_llama_cpps_rule() -> None:
    # SmolLM2: 576 and 1536 input features; 1536 = 6 x 256, 576 is not a multiple of 256 (but of 32).
    assert fallbacks("Q4_K_M", [576, 1536]) == {("Q4_K", 576): "Q5_0", ("Q6_K", 576): "Q8_0"}
    assert fallbacks("IQ4_XS", [576, 1536]) == {("IQ4_XS", 576): "IQ4_NL", ("Q5_K", 576): "Q5_1"}
    assert fallbacks("Q4_0", [576, 1536]) == {} and check_columns("Q4_0", [576]) is None
    assert check_columns("Q4_K_M", [576, 1536]) == ("llamacpp_types: Q4_K_M falls back where a type's blocks do not divide a "
                                                    "decoder linear's rows (llama.cpp's rule): Q4_K -> Q5_0 for 576 input "
                                                    "features, Q6_K -> Q8_0 for 576 input features")
    # Not a multiple of 32 either: llama.cpp would store the layer as F16, so this is refused.
    assert fallbacks("Q4_K_M", [48])[("Q4_K", 48)] == "F16"
    with pytest.raises(UserError, match="Q4_0 cannot quantize the decoder linears with 48 input features: .* as F16"):
        check_columns("q4_0", [64, 48])


# ---------------------------------------------------------------------------------------------
# llama.cpp
# ---------------------------------------------------------------------------------------------


def _peaked_llama(hidden: int = 256, intermediate: int = 512) -> LlamaForCausalLM:
    return make_peaked_llama(hidden, intermediate, scale=3)


WINDOWS = torch.randint(0, 256, (3, 128), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return _peaked_llama()


@pytest.fixture(scope="module")
def float_file(model, tmp_path_factory) -> Path:
    """The model as an F32 GGUF, checked first in a separate process to quantize and run in llama.cpp."""
    path = tmp_path_factory.mktemp("llamacpp_quantize") / "tiny-F32.gguf"
    write_gguf(model, ByteTokenizer(), "f32", path, BYTES)
    code = ("import sys, llama_cpp; from npft_lightning.quant.llamacpp_quantize import quantize_gguf; "
            "quantize_gguf(sys.argv[1], sys.argv[2], 'Q4_K_M', threads=1); "
            "llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=1); "
            "llm.eval(list(range(64))); assert llm.scores[:64].shape == (64, 256); print('ok')")
    probe = path.with_name("probe-Q4_K_M.gguf")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(probe)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0 or "ok" not in proc.stdout:
        pytest.fail(f"the llamacpp extra is installed but llama.cpp does not quantize and run a GGUF (exit code "
                    f"{proc.returncode}); rebuild it with make llamacpp: {proc.stderr[-2000:]}")
    return path


def _ppl(path: Path) -> float:
    from npft_lightning.quant.llamacpp import llamacpp_perplexity

    return llamacpp_perplexity(path, WINDOWS, n_threads=1)["ppl"]


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.asarray(t.data).copy() for t in GGUFReader(path).tensors}


@needs_extra
def test_float_file_is_the_model(model, float_file: Path) -> None:
    reader = GGUFReader(float_file)
    assert reader.fields["general.file_type"].contents() == 0  # LLAMA_FTYPE_ALL_F32
    assert {t.tensor_type for t in reader.tensors} == {GGMLQuantizationType.F32}
    weights, state = read_gguf_weights(float_file), model.state_dict()
    assert torch.equal(weights["token_embd.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(weights["blk.1.ffn_down.weight"], state["model.layers.1.mlp.down_proj.weight"])
    with torch.no_grad():
        ours = perplexity(*dataset_nll(model, WINDOWS.split(1)))
    assert _ppl(float_file) == pytest.approx(ours, rel=1e-3)


@needs_extra
@pytest.mark.parametrize("name", list(FILE_TYPES))
def test_each_file_type_loads_and_scores(name: str, float_file: Path, tmp_path: Path) -> None:
    report = quantize_gguf(float_file, tmp_path / f"tiny-{name}.gguf", name, threads=1)
    reader = GGUFReader(report["path"])
    assert reader.fields["general.file_type"].contents() == FILE_TYPES[name].ftype
    # Widths 256 and 512: no fallback, every decoder linear in one of the file type's own types.
    assert set(report["linear_types"]) <= set(FILE_TYPES[name].linear_types), report["linear_types"]
    assert sum(report["linear_types"].values()) == 14
    types = {t.name: t for t in reader.tensors if t.name.startswith("blk.") and len(t.shape) == 2}
    bits = sum(8 * int(t.n_bytes) for t in types.values()) / sum(int(t.n_elements) for t in types.values())
    assert report["bits_per_weight_linears"] == pytest.approx(bits)
    if len(report["linear_types"]) == 1:  # one type: its block size and bytes give the bits per weight
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[next(iter(report["linear_types"]))]]
        assert report["bits_per_weight_linears"] == pytest.approx(8 * size / block)
    assert report["bytes"] == Path(report["path"]).stat().st_size and not list(tmp_path.glob(".*"))
    ppl = _ppl(Path(report["path"]))
    assert np.isfinite(ppl) and ppl > 1
    if name == "Q8_0":
        assert ppl == pytest.approx(_ppl(float_file), rel=0.005)


@needs_extra
def test_fallback_types_are_the_ones_llama_cpp_writes(tmp_path: Path) -> None:
    """On 64 / 128 input features every 256-wide type falls back; the file holds exactly the predicted types."""
    model = _peaked_llama(hidden=64, intermediate=128)
    path = tmp_path / "narrow-F32.gguf"
    write_gguf(model, ByteTokenizer(), "f32", path, BYTES)
    for name, kind in FILE_TYPES.items():
        predicted = fallbacks(name, [64, 128])
        allowed = {predicted.get((t, 64), t) for t in kind.linear_types}
        report = quantize_gguf(path, tmp_path / f"narrow-{name}.gguf", name, threads=1)
        assert set(report["linear_types"]) <= allowed, (name, report["linear_types"], allowed)
    assert set(quantize_gguf(path, tmp_path / "q4km.gguf", "Q4_K_M", threads=1)["linear_types"]) == {"Q5_0", "Q8_0"}


@needs_extra
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K_M", "IQ4_XS"])
def test_an_imatrix_changes_the_quantized_tensors(name: str, model, float_file: Path, tmp_path: Path) -> None:
    names = gguf_linear_names(model)
    imatrix = collect_imatrix(model, WINDOWS.split(1), names, "random bytes")
    plain = _tensors(Path(quantize_gguf(float_file, tmp_path / "plain.gguf", name, threads=1)["path"]))
    again = _tensors(Path(quantize_gguf(float_file, tmp_path / "again.gguf", name, imatrix=None, threads=1)["path"]))
    weighted_report = quantize_gguf(float_file, tmp_path / "weighted.gguf", name, imatrix=imatrix,
                                    imatrix_file="tiny.imatrix.gguf", threads=1)
    weighted = _tensors(tmp_path / "weighted.gguf")
    assert plain.keys() == again.keys() == weighted.keys()
    assert all(np.array_equal(plain[k], again[k]) for k in plain)  # no imatrix: the same file every time
    for gguf_name in names.values():  # every decoder linear found its entry and was quantized with it
        assert plain[gguf_name].shape == weighted[gguf_name].shape and not np.array_equal(plain[gguf_name], weighted[gguf_name])
    fields = GGUFReader(tmp_path / "weighted.gguf").fields
    assert fields["quantize.imatrix.file"].contents() == "tiny.imatrix.gguf"
    assert fields["quantize.imatrix.entries_count"].contents() == 14 and fields["quantize.imatrix.chunks_count"].contents() == 3
    assert not any(k.startswith("quantize.") for k in GGUFReader(tmp_path / "plain.gguf").fields)
    assert weighted_report["imatrix"] is True

    # One entry alone changes that tensor alone: the names are the ones llama.cpp looks up.
    one = ImportanceMatrix({"blk.0.attn_q.weight": imatrix.sums["blk.0.attn_q.weight"]},
                           {"blk.0.attn_q.weight": imatrix.counts["blk.0.attn_q.weight"]}, 128, 3)
    single = _tensors(Path(quantize_gguf(float_file, tmp_path / "one.gguf", name, imatrix=one, threads=1)["path"]))
    assert [k for k in plain if not np.array_equal(plain[k], single[k])] == ["blk.0.attn_q.weight"]


def _decoder_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {t.name: (t.tensor_type.name, np.asarray(t.data).copy()) for t in GGUFReader(path).tensors
            if t.name.startswith("blk.") and len(t.shape) == 2}


def _assert_same_decoder_tensors(model, float_file: Path, name: str, with_imatrix: bool, folder: Path) -> None:
    """gguf_out with our twin of file type ``name`` writes the decoder tensors llama.cpp's quantizer writes from the F32
    export of the same model: each in the same type, byte for byte (with an imatrix: the same one for both)."""
    imatrix = collect_imatrix(model, WINDOWS.split(1), gguf_linear_names(model), "random bytes") if with_imatrix else None
    quantize_gguf(float_file, folder / "theirs.gguf", name, imatrix=imatrix, threads=1)
    quantizer = LlamaCppFileType(name).with_importance(imatrix.means() if imatrix else None)
    write_gguf(model, ByteTokenizer(), quantizer, folder / "ours.gguf", BYTES)
    theirs, ours = _decoder_tensors(folder / "theirs.gguf"), _decoder_tensors(folder / "ours.gguf")
    assert theirs.keys() == ours.keys() and len(theirs) == 14
    differ = [k for k in theirs if theirs[k][0] != ours[k][0] or not np.array_equal(theirs[k][1], ours[k][1])]
    assert not differ, f"{name}: {len(differ)} decoder tensors differ from llama.cpp's file, e.g. {differ[:3]}"


@needs_extra
@pytest.mark.parametrize("name, with_imatrix", [("Q4_K_M", False), ("IQ4_XS", False),
                                                 pytest.param("Q4_K_M", True, marks=pytest.mark.slow)])
def test_our_file_type_export_is_the_file_llama_cpp_writes(name: str, with_imatrix: bool, model, float_file: Path,
                                                           tmp_path: Path) -> None:
    _assert_same_decoder_tensors(model, float_file, name, with_imatrix, tmp_path)


@needs_extra
def test_our_file_type_export_falls_back_as_llama_cpp(float_file: Path, tmp_path: Path) -> None:
    """Rows of 64 / 128: Q4_K_M's fallbacks (Q5_0, Q8_0), the same bytes as llama.cpp's."""
    narrow = _peaked_llama(hidden=64, intermediate=128)
    path = tmp_path / "narrow-F32.gguf"
    write_gguf(narrow, ByteTokenizer(), "f32", path, BYTES)
    _assert_same_decoder_tensors(narrow, path, "Q4_K_M", False, tmp_path)
    assert {t for t, _ in _decoder_tensors(tmp_path / "ours.gguf").values()} == {"Q5_0", "Q8_0"}


@needs_extra
@pytest.mark.slow
@pytest.mark.parametrize("name", list(TWIN_FILE_TYPES))
def test_every_file_type_export_is_the_file_llama_cpp_writes(name: str, model, float_file: Path, tmp_path: Path) -> None:
    for with_imatrix in (False, True):
        _assert_same_decoder_tensors(model, float_file, name, with_imatrix, tmp_path)


@needs_extra
def test_a_failed_quantization_leaves_no_file(model, float_file: Path, tmp_path: Path) -> None:
    imatrix = collect_imatrix(model, WINDOWS[:1].split(1), gguf_linear_names(model), "random bytes")
    imatrix.sums["blk.1.ffn_down.weight"] = imatrix.sums["blk.1.ffn_down.weight"][:-1]  # one column short
    target = tmp_path / "tiny-Q4_K_M.gguf"
    with pytest.raises(UserError, match="llama.cpp could not quantize .* to Q4_K_M: imatrix size 511 is different "
                                        "from tensor size 512 for blk.1.ffn_down.weight"):
        quantize_gguf(float_file, target, "Q4_K_M", imatrix=imatrix, threads=1)
    assert list(tmp_path.iterdir()) == []  # llama.cpp had written tensors before it stopped: the temporary is gone
    target.write_bytes(b"an older file")
    with pytest.raises(UserError):
        quantize_gguf(float_file, target, "Q4_K_M", imatrix=imatrix, threads=1)
    assert target.read_bytes() == b"an older file" and list(tmp_path.iterdir()) == [target]


@needs_extra
def test_eval_writes_and_scores_llama_cpp_files(tmp_path: Path) -> None:
    from npft_lightning.quant.imatrix import read_imatrix

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "eval.py"), f"hydra.run.dir={tmp_path / 'run'}", "model=tiny-llama", "data.eval_seq_len=128",
           "data.max_eval_windows=2", "print_config=false", "quant=none", "splits=[validation,test]", "llamacpp_types=[Q8_0,q4_k_m]", "imatrix=both",
           "calibration.windows=3", "calibration.length=64", f"gguf_out={tmp_path / 'tiny.gguf'}", "llamacpp_threads=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    files = metrics["llamacpp"]
    assert set(files) == {"F32", "imatrix", "Q8_0", "Q8_0+imatrix", "Q4_K_M", "Q4_K_M+imatrix"}
    assert files["F32"]["ppl"] == pytest.approx(metrics["ppl"]["validation"]["fp"], rel=1e-3)
    for key in ("Q8_0", "Q8_0+imatrix", "Q4_K_M", "Q4_K_M+imatrix"):
        report = files[key]
        assert Path(report["path"]).is_file() and report["tokens"] == 2 * 127 and report["tokens_per_s"] > 0
        assert report["bits_per_weight"] > report["bits_per_weight_linears"] > 4  # the F32 norms weigh in the file's
        assert report["imatrix"] == key.endswith("+imatrix")
    assert files["Q8_0"]["ppl"] == pytest.approx(files["F32"]["ppl"], rel=0.01)
    # every file scored on every split, made once: the first split's scores also at the top
    for split in ("validation", "test"):
        assert files["F32"]["splits"][split]["ppl"] == pytest.approx(metrics["ppl"][split]["fp"], rel=1e-3)
    assert files["Q4_K_M"]["splits"]["validation"]["ppl"] == files["Q4_K_M"]["ppl"] != files["Q4_K_M"]["splits"]["test"]["ppl"]
    assert proc.stdout.count("llama.cpp files scored by llama.cpp") == 2
    assert files["Q4_K_M"]["path"] == str(tmp_path / "tiny-Q4_K_M.gguf")
    assert files["Q4_K_M+imatrix"]["path"] == str(tmp_path / "tiny-Q4_K_M-imatrix.gguf")
    imatrix = read_imatrix(tmp_path / "tiny.imatrix.gguf")
    assert (imatrix.chunks, imatrix.chunk_size, len(imatrix.sums)) == (3, 64, 14)
    assert set(imatrix.counts.values()) == {3 * 64}
    assert "Q4_K_M falls back" in proc.stdout and "Q4_K_M+imatrix" in proc.stdout  # the note and the table
    assert not list(tmp_path.glob(".*"))
