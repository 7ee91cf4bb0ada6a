"""GGUF export: the (adapter-merged) model as a llama.cpp file, decoder linears in ggml quantized types.

    python eval.py adapter=<run>/adapter quant=q4_0 gguf_out=model-q4_0.gguf
    python eval.py adapter=<run>/adapter quant=llamacpp_q4_k_m gguf_out=model-Q4_K_M.gguf

Two architectures are written: ``llama`` (SmolLM2, the tiny llama models) and ``gemma3`` (Gemma 3 text models:
Gemma 3 270M, the tiny Gemma 3 models). What is written:

* the decoder linears in the quantizer's ggml type: a legacy type (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), a
  K-quant (Q3_K, Q4_K, Q5_K, Q6_K) or IQ4 (IQ4_NL, IQ4_XS), or, for a llama.cpp file type
  (``quant=llamacpp_q4_k_m``, :class:`~npft_lightning.quant.llamacpp_filetype.LlamaCppFileType`), each in
  the type llama.cpp's quantizer gives it (its fallbacks, F16 included): the very codes and float16
  scales of the quantizer's twin (:meth:`~npft_lightning.quant.ggml_base.GGMLTypeQuantizer.gguf_tensor`), so
  the file dequantizes bit for bit to the fake-quant weights, and a file type's decoder tensors are the
  bytes ``llama_model_quantize`` writes from the same float model; for llama, ``attn_q`` / ``attn_k`` rows permuted as
  llama.cpp's ``convert_hf_to_gguf.py`` does (its rotary embedding pairs neighbouring features, Hugging Face's
  the two halves of each head); quantization blocks run along rows, so permuting rows commutes with it;
  gemma3 uses the NEOX rotary layout in llama.cpp, so its rows are written as they are;
* everything else as the converter leaves it at full precision: norms in F32 (gemma3: plus one, as the
  converter's ``Gemma3Model`` stores them: Hugging Face's Gemma RMSNorm scales by ``1 + weight``, llama.cpp's
  by the stored weight), the embedding (and an untied ``output``) in the smallest ggml type that holds it
  exactly: Q8_0 (true for SmolLM2 and Gemma 3 270M, whose bundled files store it as Q8_0), else F16, else F32;
* or, in float mode (``write_gguf(..., "f32" | "f16", ...)``), every matrix in F32 (exact) or F16 and the
  norms in F32: the input of llama.cpp's own quantizer (:mod:`npft_lightning.quant.llamacpp_quantize`),
  which quantizes only F32 / F16 / BF16 tensors;
* hyper-parameters from the model's config (gemma3 also: head dimension, the sliding window and which layers
  use it, the rope bases of global and sliding layers, final logit softcapping; a config llama.cpp would run
  differently, e.g. a ``query_pre_attn_scalar`` other than llama.cpp's fixed query scale, stops with one line);
  tokenizer metadata (and the descriptive ``general.*`` keys) copied from a GGUF with the same vocabulary:
  the model's own source file (SmolLM2: the bundled ``SmolLM2-135M-Instruct.Q4_1.gguf``; Gemma 3 270M:
  ``gemma-3-270m-q4_k_m.gguf``) or ``gguf_vocab=<file>``; the tiny byte-level test models get a 256-token byte
  vocabulary.

The file is written to a temporary name beside the target and renamed into place (never half-written).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.io import atomic_file
from npft_lightning.core.layers import decoder_linears
from npft_lightning.quant.ggml import GGMLQuantizer
from npft_lightning.quant.llamacpp_rules import llama_ftype

# Hugging Face model_type -> the llama.cpp architecture it is written as.
GGUF_ARCHS = {"llama": "llama", "gemma3_text": "gemma3"}
SUPPORTED_ARCHS = tuple(dict.fromkeys(GGUF_ARCHS.values()))
# The float modes of the export (the input of llama.cpp's quantizer) and their llama.cpp file types.
FLOAT_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16"}
FLOAT_TYPES = tuple(FLOAT_FILE_TYPES)
BYTES = "bytes"  # the vocabulary source of the tiny byte-tokenizer models
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
# general.* keys that describe the file's content, not the model: not copied from the vocabulary source.
_OWN_KEYS = ("general.architecture", "general.file_type", "general.quantization_version", "general.alignment")


# ---------------------------------------------------------------------------------------------
# the output file
# ---------------------------------------------------------------------------------------------


@dataclass
class GGUFPlan:
    """What ``gguf_out`` will write: one file per quantizer, and where the tokenizer metadata comes from."""

    paths: dict[str, Path]
    vocab: str  # a .gguf path, or BYTES


def gguf_paths(out: str | os.PathLike, names: list[str]) -> dict[str, Path]:
    """``out`` itself for one quantizer; ``<stem>-<name><suffix>`` beside it for several."""
    out = Path(out).expanduser()
    if len(names) == 1:
        return {names[0]: out}
    return {name: out.with_name(f"{out.stem}-{name}{out.suffix or '.gguf'}") for name in names}


@functools.lru_cache(maxsize=4)
def gguf_architecture(path: str) -> str:
    """``general.architecture`` of a GGUF file (read once per process: the config check and the export both ask)."""
    return str(_reader(path).fields["general.architecture"].contents())


@functools.lru_cache(maxsize=4)
def gguf_widths(path: str) -> tuple[int, ...]:
    """The input widths of a GGUF's decoder linears: embedding length, feed-forward length and (where the heads are
    not ``embedding_length`` wide in all, as in Gemma 3) the attention output's ``head_count * key_length``."""
    fields = _reader(path).fields
    arch = gguf_architecture(path)
    widths = [int(fields[f"{arch}.embedding_length"].contents()), int(fields[f"{arch}.feed_forward_length"].contents())]
    key_length = fields.get(f"{arch}.attention.key_length")
    if key_length is not None:
        widths.append(int(key_length.contents()) * int(fields[f"{arch}.attention.head_count"].contents()))
    return tuple(widths)


def check_gguf_output(path: Path) -> None:
    from npft_lightning.core.fs import check_writable_dir

    if path.is_dir():
        raise UserError(f"gguf_out={path} is a folder; give a file name, e.g. {path / 'model.gguf'}")
    if path.is_file() and path.stat().st_size and _magic(path) != b"GGUF":
        raise UserError(f"gguf_out={path} already exists and is not a GGUF file, so writing there would replace it; "
                        f"give another file name")
    # The file is written beside the target and renamed over it: the folder must be writable.
    try:
        check_writable_dir("gguf_out", path.parent, "give a file in a writable folder", create=False)
    except UserError as err:
        raise UserError(str(err).replace(f"gguf_out={path.parent}", f"gguf_out={path}: the folder {path.parent}", 1)) from None


def check_gguf_vocab(key: str, path: str | os.PathLike) -> None:
    """One line naming ``key`` unless ``path`` is a readable GGUF file that holds a tokenizer (read, not loaded: memory-mapped)."""
    from gguf import GGUFReader

    path = Path(path).expanduser()
    fix = "give a .gguf file with this model's tokenizer (for SmolLM2: the bundled SmolLM2-135M-Instruct.Q4_1.gguf)"
    if not path.is_file():
        raise UserError(f"{key}={path} {'is a folder' if path.is_dir() else 'does not exist'}; {fix}")
    if _magic(path) != b"GGUF":
        raise UserError(f"{key}={path} is not a GGUF file (it does not start with GGUF); {fix}")
    try:
        reader = GGUFReader(path)
    except Exception as err:  # noqa: BLE001 - a truncated file fails in many ways inside the reader
        raise UserError(f"{key}={path} cannot be read as GGUF ({type(err).__name__}; truncated?); {fix}") from None
    if "tokenizer.ggml.tokens" not in reader.fields:
        raise UserError(f"{key}={path} holds no tokenizer (tokenizer.ggml.tokens); {fix}")


def _magic(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(4)


def _reader(path: str | os.PathLike):
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not a readable GGUF file ({err})") from err


# ---------------------------------------------------------------------------------------------
# the model's hyper-parameters
# ---------------------------------------------------------------------------------------------


def _rope(config) -> tuple[float, Any]:
    """``(rope_theta, rope scaling or None)`` from transformers 5's ``rope_parameters`` or 4's fields."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    return float(theta), (None if kind == "default" else params)


def gguf_arch(config) -> str:
    """The llama.cpp architecture a model is written as; a one-line UserError for the others."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_ARCHS:
        raise UserError(f"gguf_out: model_type {model_type!r} is not supported; "
                        f"the GGUF export writes {', '.join(SUPPORTED_ARCHS)} models")
    return GGUF_ARCHS[model_type]


def gguf_hparams(config) -> dict[str, Any]:
    """The ``<arch>.*`` GGUF hyper-parameters (and ``arch``); a UserError for features this export does not write."""
    arch = gguf_arch(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hp = {
        "arch": arch,
        "context_length": int(config.max_position_embeddings),
        "embedding_length": int(config.hidden_size),
        "block_count": int(config.num_hidden_layers),
        "feed_forward_length": int(config.intermediate_size),
        "head_count": int(heads),
        "head_count_kv": int(getattr(config, "num_key_value_heads", None) or heads),
        "head_dim": int(head_dim),
        "layer_norm_rms_eps": float(config.rms_norm_eps),
        "vocab_size": int(config.vocab_size),
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
    }
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("linear biases")
    if arch == "llama":
        theta, scaling = _rope(config)
        if scaling:
            problems.append(f"rope scaling {scaling}")
        if head_dim * heads != config.hidden_size:
            problems.append(f"head_dim {head_dim} x {heads} heads != hidden size {config.hidden_size}")
        hp["rope_freq_base"] = theta
    else:
        hp.update(_gemma3_hparams(config, hp, problems))
    if problems:
        raise UserError(f"gguf_out: this {arch} model has {', '.join(problems)}, which the GGUF export does not write")
    return hp


def _gemma3_hparams(config, hp: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """What llama.cpp's gemma3 graph reads beyond the llama keys (src/models/gemma3.cpp); what it would compute
    differently from transformers goes to ``problems``."""
    # llama.cpp scales the queries by 1/sqrt(head_dim), by 1/sqrt(hidden / heads) for the 62-layer 27B; transformers
    # by query_pre_attn_scalar**-0.5: they must agree.
    scale = hp["embedding_length"] // hp["head_count"] if hp["block_count"] == 62 else hp["head_dim"]
    if float(config.query_pre_attn_scalar) != float(scale):
        problems.append(f"query_pre_attn_scalar {config.query_pre_attn_scalar} (llama.cpp scales queries by 1/sqrt({scale}))")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append(f"attention logit softcapping {config.attn_logit_softcapping}")
    if getattr(config, "use_bidirectional_attention", False):
        problems.append("bidirectional attention")
    if config.hidden_activation != "gelu_pytorch_tanh":
        problems.append(f"hidden_activation {config.hidden_activation} (llama.cpp uses tanh-approximated GELU)")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    full, local = dict(rope.get("full_attention") or {}), dict(rope.get("sliding_attention") or {})
    for kind, params in (("global", full), ("sliding", local)):
        if params.get("rope_type", "default") != "default":
            problems.append(f"rope scaling {params} of the {kind} layers")
    sliding = [kind == "sliding_attention" for kind in config.layer_types]
    if set(config.layer_types) - {"sliding_attention", "full_attention"}:
        problems.append(f"layer types {sorted(set(config.layer_types))}")
    return {
        "rope_freq_base": float(full.get("rope_theta", 1_000_000.0)),
        "rope_freq_base_swa": float(local.get("rope_theta", 10_000.0)),
        # no sliding layer: no window, which llama.cpp reads as every layer global
        "sliding_window": int(config.sliding_window) if any(sliding) and config.sliding_window else None,
        "sliding_window_pattern": sliding,
        "final_logit_softcapping": getattr(config, "final_logit_softcapping", None),
    }


def permute_rows(weight: Tensor, n_head: int) -> Tensor:
    """llama.cpp's ``LlamaModel.permute`` of a q/k projection: per head, interleave the two halves of the rows."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def unpermute_rows(weight: Tensor, n_head: int) -> Tensor:
    """The inverse of :func:`permute_rows` (what transformers applies when it reads a GGUF)."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# ---------------------------------------------------------------------------------------------
# tensors
# ---------------------------------------------------------------------------------------------


def same_bits(a: Tensor, b: Tensor) -> bool:
    return torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def lossless_tensor(weight: Tensor) -> tuple[np.ndarray, Any]:
    """``(data, ggml type)`` of a float tensor in the smallest type that holds it exactly: Q8_0, F16 or F32 (1-D: F32)."""
    from gguf import GGMLQuantizationType

    w = weight.detach().float().cpu().contiguous()
    if w.dim() == 2 and w.shape[1] % 32 == 0:
        q8 = GGMLQuantizer("q8_0")
        fields = q8.encode_weight(w)
        if same_bits(q8.decode_weight(fields), w):
            return q8.ggml_bytes(fields), q8.ggml_type
    if w.dim() >= 2 and same_bits(w.half().float(), w):
        return w.half().numpy(), GGMLQuantizationType.F16
    return w.numpy(), GGMLQuantizationType.F32


def float_tensor(weight: Tensor, float_type: str) -> tuple[np.ndarray, Any]:
    """``(data, ggml type)`` of a tensor in float mode: matrices in ``float_type`` (f32 or f16), 1-D tensors in F32."""
    from gguf import GGMLQuantizationType

    w = weight.detach().float().cpu().contiguous()
    if w.dim() >= 2 and float_type == "f16":
        return w.half().numpy(), GGMLQuantizationType.F16
    return w.numpy(), GGMLQuantizationType.F32


def _tensor_name(names, key: str, arch: str) -> str:
    gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise UserError(f"gguf_out: the model tensor {key} has no {arch} GGUF name; the export cannot write this model")
    return gguf_name


def _name_map(hp: dict[str, Any]):
    from gguf import MODEL_ARCH, get_tensor_name_map

    return get_tensor_name_map(MODEL_ARCH[hp["arch"].upper()], hp["block_count"])


def gguf_linear_names(model: nn.Module) -> dict[str, str]:
    """Canonical decoder-linear name -> its GGUF weight name (``model.layers.0.self_attn.q_proj`` -> ``blk.0.attn_q.weight``)."""
    hp = gguf_hparams(model.config)
    names = _name_map(hp)
    return {name: _tensor_name(names, f"{name}.weight", hp["arch"]) for name in decoder_linears(model)}


def writes_gguf(quantizer: Any) -> bool:
    """Whether ``quantizer`` gives the GGUF tensor of a weight (a ggml type's twin, a llama.cpp file type)."""
    return callable(getattr(quantizer, "gguf_tensor", None))


def gguf_tensors(model: nn.Module, quantizer: Any) -> dict[str, tuple[np.ndarray, Any]]:
    """GGUF name -> ``(data, ggml type)`` for every tensor of the merged ``model``; ``quantizer`` gives the
    decoder linears' tensors (:func:`writes_gguf`; the rest lossless) or is one of :data:`FLOAT_TYPES` (float mode)."""
    hp = gguf_hparams(model.config)
    names = _name_map(hp)
    linears = {f"{name}.weight": name for name in decoder_linears(model)}
    if callable(getattr(quantizer, "bind", None)):
        quantizer.bind(decoder_linears(model))  # a file type plans its tensors on the whole model
    tensors: dict[str, tuple[np.ndarray, Any]] = {}
    for key, value in model.state_dict().items():
        if hp["tied"] and key == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when output.weight is absent
        gguf_name = _tensor_name(names, key, hp["arch"])
        weight = value.detach().float().cpu()
        heads = None
        if hp["arch"] == "llama" and key.endswith("self_attn.q_proj.weight"):
            heads = hp["head_count"]
        elif hp["arch"] == "llama" and key.endswith("self_attn.k_proj.weight"):
            heads = hp["head_count_kv"]
        elif hp["arch"] == "gemma3" and key.endswith("norm.weight"):
            weight = weight + 1.0  # every Gemma 3 RMSNorm (q_norm and k_norm too) scales by 1 + weight, in float32
        if isinstance(quantizer, str):
            tensors[gguf_name] = float_tensor(weight if heads is None else permute_rows(weight, heads), quantizer)
        elif key in linears:
            # Quantized as the model holds it (a calibrated quantizer's recorded blocks are in this row order), then
            # its rows permuted: quantization runs row by row, so permuting whole rows commutes with it.
            data, ggml_type = quantizer.gguf_tensor(weight, name=linears[key])
            tensors[gguf_name] = (data if heads is None else np.ascontiguousarray(permute_rows(data, heads)), ggml_type)
        else:
            tensors[gguf_name] = lossless_tensor(weight if heads is None else permute_rows(weight, heads))
    return tensors


# ---------------------------------------------------------------------------------------------
# metadata
# ---------------------------------------------------------------------------------------------


def _copy_fields(writer, source: str | os.PathLike, vocab_size: int) -> None:
    """Copy the tokenizer and descriptive general.* keys of the GGUF ``source`` into ``writer``."""
    from gguf import GGUFValueType

    reader = _reader(source)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise UserError(f"{source} holds no tokenizer (tokenizer.ggml.tokens); give a GGUF with the model's tokenizer")
    if len(tokens.data) != vocab_size:
        raise UserError(f"{source} has a {len(tokens.data)}-token vocabulary but the model has {vocab_size} embeddings; "
                        f"give the GGUF of this model's tokenizer (gguf_vocab=)")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in _OWN_KEYS:
            continue
        if not (key.startswith("tokenizer.") or key.startswith("general.")):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def _byte_vocab(writer, tokenizer) -> None:
    """A 256-token SentencePiece-style byte vocabulary (``<0x00>`` .. ``<0xFF>``) for the byte-level test models."""
    from gguf import TokenType

    writer.add_tokenizer_model("llama")
    writer.add_token_list([f"<0x{i:02X}>" for i in range(256)])
    writer.add_token_scores([0.0] * 256)
    writer.add_token_types([int(TokenType.BYTE)] * 256)
    writer.add_eos_token_id(int(tokenizer.eos_token_id))
    writer.add_pad_token_id(int(tokenizer.pad_token_id))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)


def write_gguf(model: nn.Module, tokenizer: Any, quantizer: Any, path: str | os.PathLike, vocab: str) -> dict[str, Any]:
    """Write the merged ``model`` (a plain transformers llama model) to ``path`` as GGUF; returns a small report.

    ``quantizer`` is a ggml type's twin or a llama.cpp file type (:func:`writes_gguf`), or ``"f32"`` / ``"f16"`` for
    the float file llama.cpp's quantizer reads.
    ``vocab`` is a .gguf whose tokenizer (and general.*) metadata is copied, or :data:`BYTES`.
    """
    from gguf import GGUFWriter, LlamaFileType

    path = Path(path)
    if isinstance(quantizer, str) and quantizer not in FLOAT_TYPES:
        raise ValueError(f"float mode {quantizer!r} is not one of {', '.join(FLOAT_TYPES)}")
    hp = gguf_hparams(model.config)
    if vocab == BYTES and getattr(tokenizer, "vocab_size", None) != 256:
        raise UserError("gguf_out: the byte vocabulary is for the 256-token byte tokenizer of the tiny models; set gguf_vocab=")
    tensors = gguf_tensors(model, quantizer)
    with atomic_file(path) as tmp:
        writer = GGUFWriter(tmp, hp["arch"])
        try:
            if vocab == BYTES:
                writer.add_name(getattr(model.config, "name_or_path", None) or f"npft-tiny-{hp['arch']}")
                _byte_vocab(writer, tokenizer)
            else:
                _copy_fields(writer, vocab, hp["vocab_size"])
            if isinstance(quantizer, str):
                writer.add_file_type(int(LlamaFileType[FLOAT_FILE_TYPES[quantizer]]))
            else:
                writer.add_file_type(llama_ftype(quantizer.llama_file_type))
            writer.add_quantization_version(QUANTIZATION_VERSION)
            _add_hparams(writer, hp)
            for name, (data, ggml_type) in tensors.items():
                writer.add_tensor(name, data, raw_dtype=ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
    types: dict[str, int] = {}
    for _, ggml_type in tensors.values():
        types[ggml_type.name] = types.get(ggml_type.name, 0) + 1
    return {"path": str(path), "bytes": path.stat().st_size, "tensor_types": types}


def _add_hparams(writer, hp: dict[str, Any]) -> None:
    """The ``<arch>.*`` keys: llama's set, and gemma3's head dimension, sliding window and logit softcap."""
    writer.add_context_length(hp["context_length"])
    writer.add_embedding_length(hp["embedding_length"])
    writer.add_block_count(hp["block_count"])
    writer.add_feed_forward_length(hp["feed_forward_length"])
    writer.add_head_count(hp["head_count"])
    writer.add_head_count_kv(hp["head_count_kv"])
    if hp["arch"] == "llama":
        writer.add_rope_dimension_count(hp["head_dim"])
    writer.add_rope_freq_base(hp["rope_freq_base"])
    writer.add_layer_norm_rms_eps(hp["layer_norm_rms_eps"])
    writer.add_vocab_size(hp["vocab_size"])
    if hp["arch"] == "llama":
        return
    writer.add_key_length(hp["head_dim"])  # Gemma's heads are not hidden / heads wide (270M: 4 x 256 for 640)
    writer.add_value_length(hp["head_dim"])
    if hp["sliding_window"]:
        writer.add_sliding_window(hp["sliding_window"])
        writer.add_sliding_window_pattern(hp["sliding_window_pattern"])  # per layer (llama.cpp's default: 5 of 6)
        writer.add_rope_freq_base_swa(hp["rope_freq_base_swa"])
    if hp["final_logit_softcapping"]:
        writer.add_final_logit_softcapping(float(hp["final_logit_softcapping"]))


def read_gguf_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """GGUF name -> dequantized float32 tensor (in the model's [out, in] layout), read with the gguf package."""
    from gguf import quants

    return {t.name: torch.from_numpy(np.array(quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            for t in _reader(path).tensors}


def gguf_size_report(path: str | os.PathLike) -> dict[str, Any]:
    """Sizes of a GGUF file: bytes, bits per weight of all its tensors and of the decoder linears alone (the 2-D
    ``blk.*`` tensors), and how many tensors of each ggml type (all, and decoder linears)."""
    reader = _reader(path)
    totals = {"all": [0, 0], "linears": [0, 0]}  # bytes, elements
    types: dict[str, dict[str, int]] = {"all": {}, "linears": {}}
    for t in reader.tensors:
        groups = ("all", "linears") if t.name.startswith("blk.") and len(t.shape) == 2 else ("all",)
        for group in groups:
            totals[group][0] += int(t.n_bytes)
            totals[group][1] += int(t.n_elements)
            types[group][t.tensor_type.name] = types[group].get(t.tensor_type.name, 0) + 1
    return {
        "path": str(path),
        "bytes": Path(path).stat().st_size,
        "bits_per_weight": 8 * totals["all"][0] / max(totals["all"][1], 1),
        "bits_per_weight_linears": 8 * totals["linears"][0] / max(totals["linears"][1], 1),
        "tensor_types": types["all"],
        "linear_types": types["linears"],
    }
