"""GGUF export: a tiny llama model written with the gguf package reads back to the fake-quant weights."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType
from helpers import TINY_EVAL, assert_gguf_reads_back, make_peaked_llama, run_in_process
from torch import nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import decoder_linears
from npft_lightning.lm.models import ByteTokenizer
from npft_lightning.quant import RTN
from npft_lightning.quant.ggml import FORMATS, GGMLQuantizer
from npft_lightning.quant.gguf_export import (
    BYTES,
    lossless_tensor,
    permute_rows,
    read_gguf_weights,
    unpermute_rows,
    write_gguf,
)
from npft_lightning.quant.importance import gguf_weight_name
from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType, twin
from npft_lightning.quant.llamacpp_rules import MOSTLY


def _field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("qtype", list(FORMATS))
def test_tiny_llama_reads_back_to_the_fake_quant_weights(qtype: str, tiny_llama: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / f"tiny-{qtype}.gguf"
    assert set(assert_gguf_reads_back(tiny_llama, GGMLQuantizer(qtype), path).values()) == {qtype}

    cfg = tiny_llama.config
    weights = read_gguf_weights(path)
    reader = GGUFReader(path)
    types = {t.name: t.tensor_type for t in reader.tensors}
    # The rest at full precision, exactly; tied embeddings: no output.weight.
    state = tiny_llama.state_dict()
    assert torch.equal(weights["token_embd.weight"], state["model.embed_tokens.weight"])
    assert torch.equal(weights["output_norm.weight"], state["model.norm.weight"])
    for i in range(cfg.num_hidden_layers):
        assert torch.equal(weights[f"blk.{i}.attn_norm.weight"], state[f"model.layers.{i}.input_layernorm.weight"])
        assert torch.equal(weights[f"blk.{i}.ffn_norm.weight"], state[f"model.layers.{i}.post_attention_layernorm.weight"])
        assert types[f"blk.{i}.attn_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in weights
    assert len(weights) == 2 + cfg.num_hidden_layers * 9

    # Metadata llama.cpp needs.
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.file_type") == {"q4_0": 2, "q4_1": 3, "q5_0": 8, "q5_1": 9, "q8_0": 7}[qtype]
    assert _field(reader, "llama.block_count") == cfg.num_hidden_layers
    assert _field(reader, "llama.embedding_length") == cfg.hidden_size
    assert _field(reader, "llama.feed_forward_length") == cfg.intermediate_size
    assert _field(reader, "llama.attention.head_count") == cfg.num_attention_heads
    assert _field(reader, "llama.attention.head_count_kv") == cfg.num_key_value_heads
    assert _field(reader, "llama.rope.dimension_count") == cfg.hidden_size // cfg.num_attention_heads
    assert _field(reader, "llama.context_length") == cfg.max_position_embeddings
    assert _field(reader, "llama.vocab_size") == 256
    assert _field(reader, "tokenizer.ggml.model") == "llama"
    assert _field(reader, "tokenizer.ggml.tokens")[:2] == ["<0x00>", "<0x01>"]


@pytest.mark.parametrize("qtype", ["q6_k", "iq4_xs", *(pytest.param(t, marks=pytest.mark.slow)  # Q4_K: the file types below
                                                      for t in ("q3_k", "q4_k", "q5_k", "iq4_nl"))])
def test_k_quants_and_iq4_read_back_to_the_fake_quant_weights(qtype: str, tmp_path: Path) -> None:
    """The K-quant and IQ4 twins write llama.cpp's blocks: the file dequantizes to the fake-quant weights."""
    model = make_peaked_llama(256, 256)  # rows of 256: whole super-blocks
    path = tmp_path / f"tiny-{qtype}.gguf"
    assert set(assert_gguf_reads_back(model, twin(qtype), path).values()) == {qtype}
    reader = GGUFReader(path)
    assert _field(reader, "general.file_type") == int(LlamaFileType[f"MOSTLY_{MOSTLY[qtype]}"])  # q4_k: Q4_K_M


@pytest.mark.parametrize("file_type, hidden, intermediate", [
    ("Q4_K_M", 256, 256),   # Q4_K, Q6_K where use_more_bits picks
    ("Q4_K_M", 64, 128),    # rows of 64 / 128: Q5_0, Q8_0 (llama.cpp's fallbacks)
    ("IQ4_XS", 48, 96),     # 48: not even a multiple of 32, F16 (IQ4_NL for ffn_down)
])
def test_file_types_read_back_each_tensor_in_its_planned_type(file_type: str, hidden: int, intermediate: int,
                                                             tmp_path: Path) -> None:
    model = make_peaked_llama(hidden, intermediate)
    quantizer = LlamaCppFileType(file_type)
    path = tmp_path / f"tiny-{file_type}.gguf"
    written = assert_gguf_reads_back(model, quantizer, path)
    plan = quantizer.bind(decoder_linears(model)).types
    assert written == {gguf_weight_name(name): ggml_type for name, ggml_type in plan.items()}
    assert _field(GGUFReader(path), "general.file_type") == int(LlamaFileType[f"MOSTLY_{file_type}"])
    expected_types = {("Q4_K_M", 256): {"q4_k", "q6_k"}, ("Q4_K_M", 64): {"q5_0", "q8_0"}, ("IQ4_XS", 48): {"f16", "iq4_nl"}}
    assert set(written.values()) == expected_types[file_type, hidden]


def test_permutation_matches_llama_cpp_converter() -> None:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out, and its inverse."""
    w = torch.arange(8 * 3, dtype=torch.float32).reshape(8, 3)
    n_head = 2
    ref = w.reshape(n_head, 2, 8 // n_head // 2, 3).swapaxes(1, 2).reshape(8, 3)
    assert torch.equal(permute_rows(w, n_head), ref)
    # head 0 rows [0 1 2 3] -> [0 2 1 3]: the first and second half of the head interleaved
    assert permute_rows(w, n_head)[:4, 0].tolist() == [0.0, 6.0, 3.0, 9.0]
    assert torch.equal(unpermute_rows(permute_rows(w, n_head), n_head), w)


def test_lossless_types() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g)
    q8 = GGMLQuantizer("q8_0").quantize_weight(w)
    assert lossless_tensor(q8)[1] == GGMLQuantizationType.Q8_0
    assert lossless_tensor(w.half().float())[1] == GGMLQuantizationType.F16
    assert lossless_tensor(w)[1] == GGMLQuantizationType.F32
    assert lossless_tensor(w[0])[1] == GGMLQuantizationType.F32  # 1-D (norms) stay F32
    data, _ = lossless_tensor(w)
    assert np.array_equal(data, w.numpy())


def test_unsupported_models(tiny_opt: nn.Module, tiny_llama: nn.Module, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="model_type 'opt' is not supported"):
        write_gguf(tiny_opt, ByteTokenizer(), GGMLQuantizer("q4_0"), tmp_path / "x.gguf", BYTES)
    llama = copy.deepcopy(tiny_llama)
    llama.config.rope_scaling = {"rope_type": "linear", "factor": 2.0}
    llama.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(UserError, match="rope scaling"):
        write_gguf(llama, ByteTokenizer(), GGMLQuantizer("q4_0"), tmp_path / "x.gguf", BYTES)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(UserError, match="256-token byte tokenizer"):
        write_gguf(tiny_llama, object(), GGMLQuantizer("q4_0"), tmp_path / "x.gguf", BYTES)


def test_rtn_is_not_a_ggml_type(tiny_llama: nn.Module) -> None:
    from omegaconf import OmegaConf

    from npft_lightning.tasks.gguf_plan import plan_gguf_export

    cfg = OmegaConf.create({"gguf_out": "/tmp/x.gguf", "model": {"name": "tiny-llama", "tiny": {"arch": "llama"}}})
    with pytest.raises(UserError, match="quant.rtn4 \\(RTN\\) has no ggml type"):
        plan_gguf_export(cfg, {"rtn4": RTN(4)})


def test_plan_takes_every_twin_and_refuses_rows_a_single_type_cannot_divide(tmp_path: Path) -> None:
    """tiny-llama's rows (64 and 128 input features) fill no K-quant super-block: a lone Q4_K stops before the model
    loads, pointing at the file type that falls back as llama.cpp does; the file type and a 32-block type pass."""
    from omegaconf import OmegaConf

    from npft_lightning.quant.kquants import KQuantizer
    from npft_lightning.tasks.gguf_plan import plan_gguf_export

    cfg = OmegaConf.create({"gguf_out": str(tmp_path / "x.gguf"), "model": {"name": "tiny-llama", "tiny": {"arch": "llama"}}})
    plan = plan_gguf_export(cfg, {"llamacpp_q4_k_m": LlamaCppFileType("Q4_K_M"), "q4_0": GGMLQuantizer("q4_0")})
    assert set(plan.paths) == {"llamacpp_q4_k_m", "q4_0"}
    with pytest.raises(UserError, match=r"quant.q4_k \(q4_k\) stores blocks of 256 weights of a row, which do not divide "
                                        r"the 64 input features .* use quant=llamacpp_q4_k_m"):
        plan_gguf_export(cfg, {"q4_k": KQuantizer("q4_k")})
    cfg.model.tiny = {"arch": "llama", "hidden_size": 256, "intermediate_size": 512}
    assert plan_gguf_export(cfg, {"q4_k": KQuantizer("q4_k")}).paths == {"q4_k": tmp_path / "x.gguf"}


@pytest.mark.slow
def test_pretrained_smollm2_as_q4_1_is_the_bundled_file(tmp_path: Path) -> None:
    """SmolLM2's weights lie on the Q4_1 grid of the GGUF they came from: exporting the pretrained model as Q4_1
    must give that file back, tensor for tensor and byte for byte (names, Q/K permutation, the Q8_0 embedding),
    with the same metadata."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from npft_lightning.tasks.gguf_plan import plan_gguf_export

    spec_cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "model" / "smollm2-135m.yaml")
    spec_cfg.cache_dir = None
    cfg = OmegaConf.create({"model": spec_cfg, "gguf_out": str(tmp_path / "smollm2.gguf")})
    plan = plan_gguf_export(cfg, {"q4_1": GGMLQuantizer("q4_1")})
    model, tokenizer = instantiate(spec_cfg).load()
    report = write_gguf(model, tokenizer, GGMLQuantizer("q4_1"), plan.paths["q4_1"], plan.vocab)
    assert report["tensor_types"] == {"Q8_0": 1, "Q4_1": 210, "F32": 61}

    ours, bundled = GGUFReader(plan.paths["q4_1"]), GGUFReader(plan.vocab)
    assert report["bytes"] == Path(plan.vocab).stat().st_size
    theirs = {t.name: t for t in bundled.tensors}
    assert [t.name for t in ours.tensors] and {t.name for t in ours.tensors} == set(theirs)
    for t in ours.tensors:
        assert t.tensor_type == theirs[t.name].tensor_type, t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
    assert set(ours.fields) == set(bundled.fields)
    for key, field in bundled.fields.items():
        if not key.startswith("GGUF."):
            assert ours.fields[key].contents() == field.contents(), key


# ---------------------------------------------------------------------------------------------
# through eval.py
# ---------------------------------------------------------------------------------------------

TINY = [*TINY_EVAL, "data.max_eval_windows=2", "print_config=false"]


def test_eval_writes_gguf_and_a_self_contained_artefact(tmp_path: Path) -> None:
    import json

    run = tmp_path / "run"
    proc = run_in_process("eval.py", run, *TINY, "quant=[q4_0,q8_0]", f"gguf_out={tmp_path / 'tiny.gguf'}", f"export_dir={tmp_path / 'exp'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for name in ("q4_0", "q8_0"):  # several quantizers: <stem>-<name>.gguf
        path = tmp_path / f"tiny-{name}.gguf"
        assert metrics["gguf"][name]["path"] == str(path) and path.is_file()
        assert metrics["gguf"][name]["tensor_types"][name.upper()] == 14
    # The artefact folder carries its tokenizer: scored on its own, it gives the fake-quant PPL.
    assert (tmp_path / "exp" / "q4_0" / "byte_tokenizer.json").is_file()
    again = run_in_process("eval.py", tmp_path / "again", *TINY[1:], "model=local", f"model.path={tmp_path / 'exp' / 'q4_0'}", "quant=none")
    assert again.returncode == 0, again.stderr[-3000:]
    reloaded = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert reloaded["ppl"]["validation"]["fp"] == metrics["ppl"]["validation"]["q4_0"]


@pytest.mark.parametrize("overrides, message", [
    (["quant=rtn4", "gguf_out={tmp}/x.gguf"], "quant.rtn4 (RTN) has no ggml type"),
    (["model=tiny-opt", "quant=q4_0", "gguf_out={tmp}/x.gguf"], "architecture 'opt'; the GGUF export supports llama"),
    (["quant=q4_0", "gguf_out={tmp}/file/x.gguf"], "gguf_out={tmp}/file/x.gguf: the folder {tmp}/file cannot be created or written"),
    (["quant=q4_0", "gguf_out={tmp}"], "is a folder; give a file name"),
    (["quant=q4_0", "llamacpp_ppl=true"], "set gguf_out=<file>.gguf too"),
    (["quant=q4_0", "gguf_out={tmp}/file"], "already exists and is not a GGUF file"),
    (["quant=q4_k", "gguf_out={tmp}/x.gguf"], "which do not divide the 64 input features of this model's decoder linears"),
])
def test_bad_gguf_input_is_one_line_before_loading(overrides: list[str], message: str, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    proc = run_in_process("eval.py", tmp_path / "run", *TINY, *[o.format(tmp=tmp_path) for o in overrides])
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.format(tmp=tmp_path) in lines[0], proc.stderr
    assert not list(tmp_path.glob("**/*.gguf"))
