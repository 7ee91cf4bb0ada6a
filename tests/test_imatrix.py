"""The importance matrix: collected as llama.cpp's imatrix tool does, and its two file formats."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from helpers import make_tiny_llama
from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from npft_lightning.quant.gguf_export import gguf_linear_names
from npft_lightning.quant.imatrix import (
    ImportanceMatrix,
    collect_imatrix,
    read_imatrix,
    write_imatrix,
)

LEAVES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))


@torch.no_grad()
def _linear_inputs_by_hand(model: LlamaForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every decoder linear's input [tokens, features], the llama forward written out (RMSNorm, rotary GQA
    attention with a causal mask, SwiGLU), keyed by GGUF tensor name."""
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // heads
    batch, length = ids.shape
    h = model.model.embed_tokens(ids)
    positions = torch.arange(length)[None].expand(batch, -1)
    cos, sin = model.model.rotary_emb(h, positions)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    inputs = {}
    for i, layer in enumerate(model.model.layers):
        a = _rms_norm(layer.input_layernorm, h)
        attn = layer.self_attn
        q = (a @ attn.q_proj.weight.T).view(batch, length, heads, head_dim).transpose(1, 2)
        k = (a @ attn.k_proj.weight.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        v = (a @ attn.v_proj.weight.T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        o = (scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(batch, length, -1)
        h = h + o @ attn.o_proj.weight.T
        m = _rms_norm(layer.post_attention_layernorm, h)
        mlp = layer.mlp
        d = nn.functional.silu(m @ mlp.gate_proj.weight.T) * (m @ mlp.up_proj.weight.T)
        h = h + d @ mlp.down_proj.weight.T
        for leaf, x in zip(LEAVES, (a, a, a, o, m, m, d)):
            inputs[f"blk.{i}.{leaf}.weight"] = x.reshape(-1, x.shape[-1])
    return inputs


def test_imatrix_is_the_mean_squared_input_per_column() -> None:
    model = make_tiny_llama(intermediate_size=96, max_position_embeddings=128)
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    imatrix = collect_imatrix(model, ids.split(2), gguf_linear_names(model), "random bytes")
    by_hand = _linear_inputs_by_hand(model, ids)
    assert set(imatrix.sums) == set(by_hand) and len(by_hand) == 2 * len(LEAVES)
    assert (imatrix.chunks, imatrix.chunk_size, imatrix.datasets) == (3, 40, ["random bytes"])
    means = imatrix.means()
    for name, x in by_hand.items():
        assert imatrix.counts[name] == 3 * 40, name  # every token of every window, whatever the batching
        torch.testing.assert_close(imatrix.sums[name], x.double().square().sum(0), rtol=1e-5, atol=1e-6)
        assert means[name].dtype == torch.float32
        torch.testing.assert_close(means[name], x.square().mean(0), rtol=1e-5, atol=1e-7)
    # q / k / v read one input, gate / up another; the hooks are gone afterwards.
    assert torch.equal(imatrix.sums["blk.1.attn_q.weight"], imatrix.sums["blk.1.attn_v.weight"])
    assert torch.equal(imatrix.sums["blk.1.ffn_gate.weight"], imatrix.sums["blk.1.ffn_up.weight"])
    assert not any(m._forward_pre_hooks for m in model.modules())


def _small_imatrix() -> ImportanceMatrix:
    g = torch.Generator().manual_seed(0)
    sums = {"blk.0.ffn_down.weight": torch.rand(96, generator=g, dtype=torch.float64) * 50,
            "blk.0.attn_q.weight": torch.rand(64, generator=g, dtype=torch.float64) * 50}
    return ImportanceMatrix(sums, {"blk.0.ffn_down.weight": 200, "blk.0.attn_q.weight": 200}, chunk_size=64, chunks=3,
                            datasets=["wiki train"])


def test_gguf_imatrix_file_is_llama_cpps_layout_and_round_trips(tmp_path: Path) -> None:
    imatrix = _small_imatrix()
    path = write_imatrix(imatrix, tmp_path / "m.imatrix.gguf")
    reader = GGUFReader(path)
    # tools/imatrix/imatrix.cpp save_imatrix: raw sums and counts, in name order, and three keys.
    assert [t.name for t in reader.tensors] == ["blk.0.attn_q.weight.in_sum2", "blk.0.attn_q.weight.counts",
                                                "blk.0.ffn_down.weight.in_sum2", "blk.0.ffn_down.weight.counts"]
    assert reader.fields["general.type"].contents() == "imatrix"
    assert reader.fields["imatrix.datasets"].contents() == ["wiki train"]
    assert reader.fields["imatrix.chunk_count"].contents() == 3 and reader.fields["imatrix.chunk_size"].contents() == 64
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight.counts"].tolist() == [200.0]
    assert np.array_equal(tensors["blk.0.attn_q.weight.in_sum2"], imatrix.sums["blk.0.attn_q.weight"].float().numpy())

    back = read_imatrix(path)
    assert back.counts == imatrix.counts and (back.chunks, back.chunk_size, back.datasets) == (3, 64, ["wiki train"])
    for name, s in imatrix.sums.items():
        assert torch.equal(back.sums[name], s.float().double())
        torch.testing.assert_close(back.means()[name], imatrix.means()[name], rtol=1e-6, atol=0)
    assert not list(tmp_path.glob(".*"))  # written atomically: no temporary left


def test_legacy_dat_imatrix_is_llama_cpps_layout_and_round_trips(tmp_path: Path) -> None:
    imatrix = _small_imatrix()
    path = write_imatrix(imatrix, tmp_path / "m.imatrix.dat")
    # save_imatrix_legacy, written out: entries in name order, mean * ncall with ncall = ceil(200 / 64) = 4.
    expected = struct.pack("<i", 2)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        values = (imatrix.sums[name] / 200 * 4).float().numpy()
        expected += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", 4, values.size) + values.tobytes()
    expected += struct.pack("<ii", 3, len("wiki train")) + b"wiki train"
    assert path.read_bytes() == expected

    back = read_imatrix(path)
    assert (back.chunks, back.datasets) == (3, ["wiki train"])
    for name in imatrix.sums:  # llama-quantize's value / ncall: the mean again
        torch.testing.assert_close(back.means()[name], imatrix.means()[name], rtol=1e-6, atol=0)
    assert read_imatrix(write_imatrix(back, tmp_path / "again.dat")).means().keys() == imatrix.means().keys()
    assert (tmp_path / "again.dat").read_bytes() == expected


def test_unreadable_imatrix_file_is_one_line(tmp_path: Path) -> None:
    from npft_lightning.core.errors import UserError

    (tmp_path / "x.dat").write_bytes(b"\x05\x00\x00\x00\xff")
    with pytest.raises(UserError, match="is neither a GGUF nor a legacy .dat imatrix"):
        read_imatrix(tmp_path / "x.dat")
