"""GPTQ on a ggml type's grid: the fields are the type's (its bytes dequantize to the fake-quant weight, bit for
bit), the layer's output error is below llama.cpp's own rounding of the same type (with and without the imatrix),
and a tiny llama's GGUF holds the very blocks GPTQ chose."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import quants
from helpers import TINY_EVAL, assert_gguf_reads_back, run_in_process
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.quant.gptq_ggml import GPTQGGML, ggml_twin, gptq_ggml_fields

TYPES = ["q4_0", "q5_0", "q4_1", "q8_0", "q3_k", "q4_k", "q6_k", "iq4_nl", "iq4_xs"]


def _problem(out: int, inp: int, n: int = 2048, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """A weight, correlated inputs of uneven scale per column (so the Hessian is far from diagonal) and H = 2/n XᵀX."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * 0.05
    mix = torch.randn(inp, inp, generator=g) / inp**0.5 + 0.3 * torch.eye(inp)
    x = (torch.randn(n, inp, generator=g) @ mix) * torch.exp(torch.randn(inp, generator=g))
    return w, x, 2 * x.T @ x / n


def _output_error(x: Tensor, w: Tensor, q: Tensor) -> float:
    return float((x @ (w - q).T).norm())


@pytest.mark.parametrize("qtype", TYPES)
def test_fields_are_the_types_and_beat_llama_cpps_rounding(qtype: str) -> None:
    w, x, h = _problem(16, 512)
    twin = ggml_twin(qtype)
    fields = gptq_ggml_fields(w, h, twin)
    q = twin.decode_weight(fields)
    # the bytes of a GGUF tensor of this type: the gguf package dequantizes them to the very same weight
    stored = quants.dequantize(twin.ggml_bytes(fields), twin.ggml_type)
    assert torch.equal(torch.from_numpy(np.array(stored, dtype=np.float32)).view(torch.int32), q.view(torch.int32))
    assert int(fields["codes"].max()) < 2**twin.bits
    # llama.cpp's own rounding of the type, without and with the imatrix (the mean squared input of each column)
    plain = twin.quantize_weight(w)
    name = "model.layers.0.mlp.up_proj"
    imatrix = ggml_twin(qtype).with_importance({name: (x * x).mean(0)}).quantize_weight(w, name=name)
    assert _output_error(x, w, q) < 0.9 * min(_output_error(x, w, plain), _output_error(x, w, imatrix)), qtype


def test_static_groups_beat_dynamic_ones_in_act_order_for_k_quants() -> None:
    """The default (every super-block's scales up front): with act order, a 256-wide group set from its values when
    its first column comes up has drifted far from them by its last column."""
    w, x, h = _problem(16, 512)
    twin = ggml_twin("q4_k")
    static = _output_error(x, w, twin.decode_weight(gptq_ggml_fields(w, h, twin)))
    dynamic = _output_error(x, w, twin.decode_weight(gptq_ggml_fields(w, h, twin, static_groups=False)))
    assert static < 0.5 * dynamic


def test_weighted_scales_and_dead_columns() -> None:
    w, x, h = _problem(16, 256, seed=1)
    h[5, :] = 0
    h[:, 5] = 0  # a column that never sees an input
    w[3] = 0  # an all-zero row: every block flat
    twin = ggml_twin("q4_0")
    for weighted in (True, False):
        for static in (True, False):
            q = twin.decode_weight(gptq_ggml_fields(w, h, twin, weighted_scales=weighted, static_groups=static))
            assert torch.isfinite(q).all() and torch.equal(q[3], torch.zeros_like(q[3]))
    weighted = twin.decode_weight(gptq_ggml_fields(w, h, twin, weighted_scales=True))
    unweighted = twin.decode_weight(gptq_ggml_fields(w, h, twin, weighted_scales=False))
    assert not torch.equal(weighted, unweighted)  # the Hessian's diagonal does steer the scale search


def test_quantize_matrix_is_the_types_grid() -> None:
    w, _, h = _problem(8, 64)
    quantizer = GPTQGGML("q4_0")
    assert torch.equal(quantizer.quantize_matrix(w, h), quantizer.twin.decode_weight(gptq_ggml_fields(w, h, quantizer.twin)))


def test_refusals() -> None:
    with pytest.raises(ValueError, match="qtype=q2_k is not a ggml type GPTQ can round to; use one of q4_0"):
        GPTQGGML("q2_k")
    w, _, h = _problem(4, 96)
    with pytest.raises(UserError, match="input features"):
        gptq_ggml_fields(w, h, ggml_twin("q4_k"))
    with pytest.raises(UserError, match="no GPTQ pass has quantized"):
        GPTQGGML("q4_0").gguf_tensor(torch.zeros(4, 32), name="model.layers.0.mlp.up_proj")


@pytest.mark.parametrize("qtype", ["q4_0", "q8_0"])
def test_tiny_llama_gguf_holds_the_gptq_blocks(qtype: str, tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    quantizer = GPTQGGML(qtype, batch_size=2)
    types = assert_gguf_reads_back(tiny_llama, quantizer, tmp_path / f"tiny-gptq-{qtype}.gguf", calibration=token_windows)
    assert set(types.values()) == {qtype}
    # the blocks are GPTQ's, not the type's own rounding of the same weights
    assert any(not torch.equal(fields["codes"], quantizer.twin.encode_weight(lin.weight.float())["codes"])
               for fields, lin in zip(quantizer.recorded.values(), (dict(tiny_llama.named_modules())[n] for n in quantizer.recorded)))


def test_eval_scores_and_writes_gptq_q4_0(tmp_path: Path) -> None:
    """eval.py quant=gptq_q4_0 gguf_out=...: the file holds Q4_0 tensors at 4.5 bits per weight and, scored by
    llama.cpp where the llamacpp extra is installed, gives the fake-quant PPL."""
    import importlib.util
    import json

    scored = importlib.util.find_spec("llama_cpp") is not None
    proc = run_in_process("eval.py", tmp_path / "run", *TINY_EVAL, "data.max_eval_windows=2", "print_config=false", "quant=[gptq_q4_0]",
                          "calibration.windows=2", f"gguf_out={tmp_path / 'tiny.gguf'}", *(["llamacpp_ppl=true"] if scored else []))
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    gguf = metrics["gguf"]["gptq_q4_0"]
    assert gguf["tensor_types"]["Q4_0"] == 14 and metrics["bits"]["gptq_q4_0"]["bits_per_weight"] == pytest.approx(4.5)
    if scored:
        assert gguf["ppl_ratio"] == pytest.approx(1.0, abs=0.01)


def test_a_file_type_follows_llama_cpps_plan(tiny_llama: nn.Module, token_windows: Tensor, tmp_path: Path) -> None:
    """gptq_q4_k_m: each linear in the type llama.cpp gives it in a Q4_K_M file (on the tiny model's 64 / 128 input
    features, the fallbacks), GPTQ's blocks in the file; the same for IQ4_XS (its fallback IQ4_NL: a table)."""
    from npft_lightning.core.layers import decoder_linears
    from npft_lightning.quant.importance import gguf_weight_name
    from npft_lightning.quant.llamacpp_filetype import LlamaCppFileType

    quantizer = GPTQGGML(file_type="Q4_K_M", batch_size=2)
    types = assert_gguf_reads_back(tiny_llama, quantizer, tmp_path / "tiny-gptq-q4_k_m.gguf", calibration=token_windows)
    plan = LlamaCppFileType("Q4_K_M").with_importance({}).bind(decoder_linears(tiny_llama)).types  # as llama.cpp with --imatrix
    assert types == {gguf_weight_name(n): t for n, t in plan.items()} and len(set(types.values())) > 1
    iq4 = GPTQGGML(file_type="IQ4_XS", batch_size=2)  # on 64 / 128 input features: IQ4_NL, a table of 16 levels
    assert set(assert_gguf_reads_back(tiny_llama, iq4, tmp_path / "tiny-gptq-iq4_xs.gguf", calibration=token_windows).values()) == {"iq4_nl"}
    with pytest.raises(ValueError, match="give one"):
        GPTQGGML("q4_0", "Q4_K_M")
