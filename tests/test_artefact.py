"""Real quantized export: bit packing, save -> load bit-exact against fake quantization, sizes, errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from helpers import assert_export_exact, fake_quant_reference, fill_lora_b
from torch import Tensor, nn

from npft_lightning.core.layers import decoder_linears
from npft_lightning.quant import (
    GPTQ,
    NF4,
    RTN,
    CubeRoot,
    DenseAndSparse,
    GGMLQuantizer,
    KMeans,
    WeightQuantizer,
    fake_quantized,
    load_quantized,
    pack_bits,
    quantized_size_report,
    save_quantized,
    unpack_bits,
)
from npft_lightning.quant.artefact import (
    CONFIG_FILE,
    QUANTIZED_FILE,
    quantizer_config,
    quantizer_from_config,
)
from npft_lightning.quant.packing import packed_numel

# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("numel", [0, 1, 7, 8, 13, 64, 1001])
def test_pack_unpack_round_trip(bits: int, numel: int) -> None:
    g = torch.Generator().manual_seed(bits * 1000 + numel)
    codes = torch.randint(0, 2**bits, (numel,), generator=g).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_numel(numel, bits) == -(-numel * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, numel), codes)


def test_pack_layout_and_errors() -> None:
    # 3 bits: codes 0..7 -> the 24-bit little-endian word 0o76543210 = 0xFAC688.
    assert pack_bits(torch.arange(8, dtype=torch.uint8), 3).tolist() == [0x88, 0xC6, 0xFA]
    assert torch.equal(pack_bits(torch.full((2, 8), 255, dtype=torch.uint8), 8), torch.full((16,), 255, dtype=torch.uint8))
    with pytest.raises(ValueError, match="does not fit in 3 bits"):
        pack_bits(torch.tensor([8], dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="bytes"):
        unpack_bits(torch.zeros(5, dtype=torch.uint8), 3, 16)


# ---------------------------------------------------------------------------------------------
# save -> load equals fake quantization
# ---------------------------------------------------------------------------------------------


QUANTIZERS = {
    "rtn4": lambda: RTN(4),
    "rtn3_sym": lambda: RTN(3, sym=True),
    "rtn4_g32": lambda: RTN(4, group_size=32),
    "rtn3_sym_g32": lambda: RTN(3, group_size=32, sym=True),
    "kmeans3": lambda: KMeans(3, iters=10),
    "cuberoot4_g32": lambda: CubeRoot(4, group_size=32),
    "nf4": lambda: NF4(block_size=32),
    "rtn3_sparse": lambda: DenseAndSparse(RTN(3), keep_ratio=1.0),
    "q4_0": lambda: GGMLQuantizer("q4_0"),
    "q4_1": lambda: GGMLQuantizer("q4_1"),
    "q5_0": lambda: GGMLQuantizer("q5_0"),
}


@pytest.mark.parametrize("key", list(QUANTIZERS))
def test_export_matches_fake_quant(key: str, tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    quantizer = QUANTIZERS[key]()
    report = assert_export_exact(tiny_llama, quantizer, tmp_path / key, token_windows[:2])
    assert report["codes_bytes"] == sum(packed_numel(lin.weight.numel(), quantizer_bits(quantizer))
                                        for lin in decoder_linears(tiny_llama).values())
    assert report["codes_ratio"] == pytest.approx(quantizer_bits(quantizer) / 16)
    assert report["linear_ratio"] < 0.5  # metadata included, still well under fp16 at 3-4 bits


def quantizer_bits(q: WeightQuantizer) -> int:
    return q.base.bits if isinstance(q, DenseAndSparse) else q.bits


def test_gptq_export_matches_fake_quant(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    gptq = GPTQ(4, group_size=32, act_order=True)
    report = assert_export_exact(tiny_llama, gptq, tmp_path / "gptq", token_windows[:2], calibration=token_windows)
    assert report["codes_ratio"] == pytest.approx(4 / 16)


def test_dense_and_sparse_gptq_and_opt(tiny_opt: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """A model-level base under the sparse wrapper, on OPT (biases in the decoder linears)."""
    quantizer = DenseAndSparse(GPTQ(3, act_order=False), keep_ratio=0.5)
    report = assert_export_exact(tiny_opt, quantizer, tmp_path / "ds", token_windows[:2], calibration=token_windows)
    kept = sum(round(lin.weight.numel() * 0.005) for lin in decoder_linears(tiny_opt).values())
    assert report["sparse_bytes"] == kept * (4 + 4)  # int32 position + float32 value


def test_sensitivity_kmeans_and_bf16_model(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """Fisher-weighted k-means is exported from its own ``sensitivity``; a bf16 model keeps bf16 elsewhere."""
    from transformers import AutoModelForCausalLM

    # Loaded as a real bf16 checkpoint is (``.to(bfloat16)`` would also cast the float32 rotary buffers).
    tiny_llama.save_pretrained(tmp_path / "bf16")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    kmeans = KMeans(3, iters=10)
    kmeans.sensitivity = {n: torch.rand(lin.weight.shape, generator=g) for n, lin in decoder_linears(model).items()}
    quantizer = DenseAndSparse(kmeans, keep_ratio=1.0)
    assert_export_exact(model, quantizer, tmp_path / "kmeans_bf16", token_windows[:2])
    assert load_quantized(tmp_path / "kmeans_bf16").dtype == torch.bfloat16
    config = json.loads((tmp_path / "kmeans_bf16" / CONFIG_FILE).read_text())
    fields = config["linears"]["model.layers.0.mlp.up_proj"]["fields"]
    assert fields["codes"]["bits"] == 3 and fields["sparse_value"]["dtype"] == "float32"
    from safetensors import safe_open

    with safe_open(tmp_path / "kmeans_bf16" / QUANTIZED_FILE, "pt") as f:  # exact bf16 values stored in 2 bytes
        assert f.get_slice("model.layers.0.mlp.up_proj.sparse_value").get_dtype() in ("BF16", "F16")


def test_peft_model_with_deltas(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """Export of a LoRA-wrapped model: Q(W + BA·s), with the adapters dropped from the saved model."""
    from peft import LoraConfig, get_peft_model

    peft_model = fill_lora_b(get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], lora_dropout=0.0)))
    deltas = {}
    for name, module in peft_model.named_modules():
        if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
            deltas[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").detach()
    assert len(deltas) == 4
    quantizer = RTN(4, group_size=32)
    batch = token_windows[:2]
    linears = decoder_linears(peft_model)
    with peft_model.disable_adapter():
        weights, logits = fake_quant_reference(peft_model, quantizer, batch, deltas=deltas)
        save_quantized(peft_model, linears, quantizer, tmp_path / "peft", deltas=deltas)
    loaded = load_quantized(tmp_path / "peft")
    assert not any("lora" in name for name, _ in loaded.named_parameters())
    for name, lin in decoder_linears(loaded).items():
        assert torch.equal(lin.weight, weights[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=batch).logits, logits)


def test_subset_of_linears(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """Linears left out of ``linears`` are saved (and loaded) unquantized."""
    mlp = {n: lin for n, lin in decoder_linears(tiny_llama).items() if ".mlp." in n}
    reference = copy.deepcopy(tiny_llama)
    with torch.no_grad(), fake_quantized(reference, {n: decoder_linears(reference)[n] for n in mlp}, RTN(3)):
        weights = {n: lin.weight.clone() for n, lin in decoder_linears(reference).items()}
    save_quantized(tiny_llama, mlp, RTN(3), tmp_path / "mlp")
    loaded = load_quantized(tmp_path / "mlp")
    assert all(torch.equal(lin.weight, weights[n]) for n, lin in decoder_linears(loaded).items())
    assert quantized_size_report(tmp_path / "mlp")["linear_weights"] == sum(lin.weight.numel() for lin in mlp.values())


def test_size_report(tiny_llama: nn.Module, tmp_path: Path) -> None:
    save_quantized(tiny_llama, decoder_linears(tiny_llama), RTN(4), tmp_path / "a")
    report = quantized_size_report(tmp_path / "a")
    assert report == quantized_size_report(tmp_path / "a", tiny_llama)  # same parameter count either way
    rows = sum(lin.out_features for lin in decoder_linears(tiny_llama).values())
    # per-channel asym: a float32 scale and a 4-bit zero per row (zeros of all rows packed together per matrix)
    assert report["meta_bytes"] == rows * 4 + sum(packed_numel(lin.out_features, 4) for lin in decoder_linears(tiny_llama).values())
    assert report["linear_bytes_fp16_scales"] == report["linear_bytes"] - rows * 2
    # 4/16 for the codes plus 4.5 bytes of metadata per row of only 64-128 fp16 columns
    assert report["total_ratio"] < 1.0 and report["linear_ratio"] < 0.3
    assert report["total_bytes"] == sum(f.stat().st_size for f in (tmp_path / "a").iterdir())
    assert report["tokenizer_bytes"] == 0


def test_artefact_with_tokenizer_loads_on_its_own(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """With the tokenizer inside, the folder is a model of its own: model=local model.path=<folder> loads it
    (decoded linears, not a random init), and the size report leaves the tokenizer files out."""
    from npft_lightning.lm.models import ByteTokenizer, CausalLMSpec

    weights, logits = fake_quant_reference(tiny_llama, GGMLQuantizer("q4_0"), token_windows[:2])
    save_quantized(tiny_llama, decoder_linears(tiny_llama), GGMLQuantizer("q4_0"), tmp_path / "a", tokenizer=ByteTokenizer())
    config = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    assert config["tokenizer_files"] == ["byte_tokenizer.json"]
    model, tokenizer = CausalLMSpec(name="local", path=str(tmp_path / "a")).load()
    assert isinstance(tokenizer, ByteTokenizer)
    assert all(torch.equal(lin.weight, weights[n]) for n, lin in decoder_linears(model).items())
    with torch.no_grad():
        assert torch.equal(model(input_ids=token_windows[:2]).logits, logits)
    report = quantized_size_report(tmp_path / "a")
    size = (tmp_path / "a" / "byte_tokenizer.json").stat().st_size
    assert report["tokenizer_bytes"] == size
    assert report["total_bytes"] == sum(f.stat().st_size for f in (tmp_path / "a").iterdir()) - size


# ---------------------------------------------------------------------------------------------
# config round trip, overwrite, errors
# ---------------------------------------------------------------------------------------------


def test_quantizer_config_round_trip() -> None:
    for q in [RTN(3, 32, True), GPTQ(4, act_order=False, static_groups=True), KMeans(2, 7), NF4(32),
              CubeRoot(4, sym=True), DenseAndSparse(NF4(), 0.3), GGMLQuantizer("q5_1")]:
        rebuilt = quantizer_from_config(json.loads(json.dumps(quantizer_config(q))))
        assert type(rebuilt) is type(q) and repr(rebuilt) == repr(q)
    with pytest.raises(ValueError, match="unknown quantizer class"):
        quantizer_from_config({"class": "os.system", "params": {}})


@pytest.mark.parametrize("key", ["q4_1", "q4_k", "iq4_xs", "Q4_K_M"])
def test_ggml_twins_record_what_older_artefacts_hold(key: str) -> None:
    """The ggml twins share one base class: their recorded class paths and parameters stay those of the artefacts
    written before it, so those still load."""
    from npft_lightning.quant.iq4 import IQ4Quantizer
    from npft_lightning.quant.kquants import KQuantizer
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType

    quantizer, recorded = {
        "q4_1": (GGMLQuantizer("q4_1"), {"class": "npft_lightning.quant.ggml.GGMLQuantizer",
                                         "params": {"qtype": "q4_1", "name": "q4_1"}}),
        "q4_k": (KQuantizer("q4_k"), {"class": "npft_lightning.quant.kquants.KQuantizer",
                                      "params": {"qtype": "q4_k", "name": "q4_k"}}),
        "iq4_xs": (IQ4Quantizer("iq4_xs"), {"class": "npft_lightning.quant.iq4.IQ4Quantizer",
                                            "params": {"qtype": "iq4_xs", "name": "iq4_xs"}}),
        "Q4_K_M": (LlamaCppFileType("Q4_K_M"), {"class": "npft_lightning.quant.llamacpp_filetype.LlamaCppFileType",
                                                "params": {"file_type": "Q4_K_M", "name": "llamacpp_q4_k_m"}}),
    }[key]
    assert quantizer_config(quantizer) == recorded
    rebuilt = quantizer_from_config(recorded)
    assert type(rebuilt) is type(quantizer) and repr(rebuilt) == repr(quantizer)
    w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0))
    if key != "Q4_K_M":  # a file type needs its plan (bind): its round trip is tested in test_llamacpp_filetype
        assert torch.equal(rebuilt.quantize_weight(w), quantizer.quantize_weight(w))
        assert rebuilt.bits == quantizer.bits == 4  # the width the artefact packed the codes at


def test_overwrite_and_errors(tiny_llama: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "art"
    linears = decoder_linears(tiny_llama)
    save_quantized(tiny_llama, linears, RTN(4), path)
    save_quantized(tiny_llama, linears, RTN(3), path)  # replaces the folder, leaves nothing beside it
    assert json.loads((path / CONFIG_FILE).read_text())["bits"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_quantized(tmp_path / "nowhere")
    data = (path / QUANTIZED_FILE).read_bytes()
    (path / QUANTIZED_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=QUANTIZED_FILE):
        load_quantized(path)
    (path / QUANTIZED_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=QUANTIZED_FILE):
        load_quantized(path)
    (path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=CONFIG_FILE):
        load_quantized(path)
