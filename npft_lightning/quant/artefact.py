"""Real quantized export: packed integer codes plus scales / lookup tables in safetensors.

An artefact is a folder::

    quantized.safetensors   per decoder linear <name>: <name>.codes (bit-packed), <name>.scale, ...
    quant_config.json       format version, quantizer class + parameters, per-linear field layout
    model.safetensors, config.json, ...   the rest of the model (embeddings, norms, lm_head, biases)
                            via the model's own ``save_pretrained``, without the decoder linear weights
    tokenizer files         when a tokenizer is given (eval.py always gives it): the folder loads on its own,
                            e.g. ``python eval.py model=local model.path=<folder> quant=none``

:func:`load_quantized` loads the rest with ``AutoModelForCausalLM.from_pretrained`` and writes the
decoded weights into the decoder linears: the result is bit for bit the fake-quantized model of
:func:`~npft_lightning.quant.base.fake_quantized` (same quantizer, deltas, calibration), because
both go through the quantizer's ``encode``/``decode`` pair and the storage below is lossless.

Each field is stored in its smallest lossless form, and restored to its original dtype and shape:

* integer codes (uint8 < 2^bits, and float32 tensors holding only such integers, e.g. RTN zero
  points) are bit-packed at the quantizer's ``bits`` (:func:`pack_bits`);
* float32 tensors that round-trip exactly through float16 / bfloat16 (e.g. the kept sparse values of
  a half-precision model) are stored in that dtype; other floats (scales, tables) stay float32;
* int64 tensors that fit (sparse positions) are stored as int32.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from npft_lightning.io import atomic_dir
from npft_lightning.layers import canonical_name, decoder_linears
from npft_lightning.quant.base import WeightQuantizer, weights_restored

FORMAT = "npft-quantized"
VERSION = 1
QUANTIZED_FILE = "quantized.safetensors"
CONFIG_FILE = "quant_config.json"

# ---------------------------------------------------------------------------------------------
# bit packing
# ---------------------------------------------------------------------------------------------

_PACK_CHUNK = 1 << 20  # groups of 8 codes per step: bounds the int64 temporaries to 64 MiB


def packed_numel(numel: int, bits: int) -> int:
    """Bytes holding ``numel`` codes of ``bits`` bits: ``ceil(numel · bits / 8)``."""
    return -(-numel * bits // 8)


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 codes (< 2^bits) densely into a 1-D uint8 tensor of :func:`packed_numel` bytes.

    Layout: the flattened codes, zero-padded to a multiple of 8, in groups of 8; code ``i`` of a
    group sits in bits ``[i·bits, (i+1)·bits)`` of a little-endian ``8·bits``-bit word, stored as
    ``bits`` bytes, least significant first (3-bit: 8 codes in 3 bytes). Bytes holding only
    padding are dropped, so the whole buffer is the little-endian bit stream of the codes.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= 2**bits:
        raise ValueError(f"a code is {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    groups = torch.cat([flat, flat.new_zeros(-flat.numel() % 8)]).reshape(-1, 8)
    code_shift = torch.arange(8, device=flat.device) * bits
    byte_shift = torch.arange(bits, device=flat.device) * 8
    out = []
    for part in groups.split(_PACK_CHUNK):
        # The codes occupy disjoint bits of the (at most 56-bit) word, so their sum is their OR.
        words = (part.long() << code_shift).sum(dim=1)
        out.append(((words[:, None] >> byte_shift) & 0xFF).to(torch.uint8).reshape(-1))
    return (torch.cat(out) if out else flat.new_zeros(0))[: packed_numel(flat.numel(), bits)]


def unpack_bits(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes (1-D uint8) of a :func:`pack_bits` buffer."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits} is outside 1..8")
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != packed_numel(numel, bits):
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {packed_numel(numel, bits)} bytes for {numel} "
            f"{bits}-bit codes, got {packed.dtype} {tuple(packed.shape)}"
        )
    if bits == 8:
        return packed.clone()
    code_shift = torch.arange(8, device=packed.device) * bits
    byte_shift = torch.arange(bits, device=packed.device) * 8
    padded = torch.cat([packed, packed.new_zeros(-(-numel // 8) * bits - packed.numel())])
    out = []
    for part in padded.reshape(-1, bits).split(_PACK_CHUNK):
        words = (part.long() << byte_shift).sum(dim=1)
        out.append(((words[:, None] >> code_shift) & (2**bits - 1)).to(torch.uint8).reshape(-1))
    return (torch.cat(out) if out else packed.new_zeros(0))[:numel]


# ---------------------------------------------------------------------------------------------
# lossless storage of one field
# ---------------------------------------------------------------------------------------------

_DTYPES = {str(d).removeprefix("torch."): d for d in (torch.uint8, torch.int32, torch.int64, torch.float16, torch.bfloat16, torch.float32)}

_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I32": torch.int32, "I64": torch.int64, "F16": torch.float16,
                       "BF16": torch.bfloat16, "F32": torch.float32}


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (so -0.0 != 0.0 and a NaN equals itself)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(_int_view(a.dtype)), b.view(_int_view(b.dtype)))


def _int_view(dtype: torch.dtype) -> torch.dtype:
    return {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[dtype.itemsize]


def _store(t: Tensor, bits: int) -> tuple[Tensor, dict[str, Any]]:
    """The smallest lossless stored form of ``t`` and what :func:`_restore` needs to undo it."""
    t = t.detach().cpu().contiguous()
    if t.dtype not in _DTYPES.values():
        raise TypeError(f"cannot store a {t.dtype} field; use uint8 codes, int64 indices or float32 values")
    meta: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if t.dtype in (torch.uint8, torch.float32) and t.numel():
        codes = t.nan_to_num(0).clamp(0, 255).to(torch.uint8)  # only kept if it gives t back bit for bit
        if int(codes.max()) < 2**bits and _same_bits(codes.to(t.dtype), t):
            return pack_bits(codes, bits), {**meta, "bits": bits}
    if t.dtype == torch.float32:
        for half in (torch.float16, torch.bfloat16):
            if _same_bits(t.to(half).float(), t):
                return t.to(half), meta
    if t.dtype == torch.int64 and (t.numel() == 0 or (int(t.min()) >= -(2**31) and int(t.max()) < 2**31)):
        return t.to(torch.int32), meta
    return t, meta


def _restore(stored: Tensor, meta: Mapping[str, Any], key: str) -> Tensor:
    """Undo :func:`_store` (raises ValueError naming ``key`` if the stored tensor does not fit ``meta``)."""
    shape, dtype = list(meta["shape"]), _DTYPES.get(meta["dtype"])
    if dtype is None:
        raise ValueError(f"tensor {key}: unknown dtype {meta['dtype']!r}")
    numel = math.prod(shape)
    if "bits" in meta:
        stored = unpack_bits(stored, int(meta["bits"]), numel)
    if stored.numel() != numel:
        raise ValueError(f"tensor {key} has {stored.numel()} values, the config says shape {shape}")
    return stored.reshape(shape).to(dtype)


# ---------------------------------------------------------------------------------------------
# quantizer <-> config
# ---------------------------------------------------------------------------------------------


def quantizer_config(quantizer: WeightQuantizer) -> dict[str, Any]:
    """``{"class": module.Class, "params": constructor arguments}``, read back from the attributes."""
    params: dict[str, Any] = {}
    for p in list(inspect.signature(type(quantizer).__init__).parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(quantizer, p.name):
            raise ValueError(f"cannot record {type(quantizer).__name__}: its argument {p.name!r} is not kept as an attribute")
        value = getattr(quantizer, p.name)
        params[p.name] = quantizer_config(value) if isinstance(value, WeightQuantizer) else value
    return {"class": f"{type(quantizer).__module__}.{type(quantizer).__qualname__}", "params": params}


def _subclasses(cls: type) -> Iterator[type]:
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def quantizer_from_config(config: Mapping[str, Any]) -> WeightQuantizer:
    """Rebuild a quantizer from :func:`quantizer_config` (only imported WeightQuantizer subclasses, no import by name)."""
    classes = {f"{c.__module__}.{c.__qualname__}": c for c in _subclasses(WeightQuantizer)}
    cls = classes.get(config["class"])
    if cls is None:
        raise ValueError(f"unknown quantizer class {config['class']!r}; known: {sorted(classes)}")
    params = {
        k: quantizer_from_config(v) if isinstance(v, dict) and "class" in v else v for k, v in config["params"].items()
    }
    return cls(**params)


def code_bits(quantizer: WeightQuantizer) -> int:
    """The bit width of the quantizer's codes (a wrapper's base quantizer's)."""
    if isinstance(getattr(quantizer, "bits", None), int):
        return quantizer.bits
    if isinstance(getattr(quantizer, "base", None), WeightQuantizer):
        return code_bits(quantizer.base)
    raise ValueError(f"{type(quantizer).__name__} has no integer `bits` attribute; cannot pack its codes")


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rest_state_dict(model: nn.Module, linear_names: set[str]) -> dict[str, Tensor]:
    """Everything but the decoder linear weights, under canonical (un-PEFT-ed) names; LoRA tensors dropped."""
    rest = {}
    for key, value in _hf_model(model).state_dict().items():
        if ".lora_" in key:
            continue
        key = canonical_name(key)
        if key.removesuffix(".weight") in linear_names and key.endswith(".weight"):
            continue
        rest[key] = value
    return rest


@torch.no_grad()
def save_quantized(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer,
    path: str | os.PathLike,
    calibration: Tensor | None = None,
    deltas: Mapping[str, Tensor] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Write the quantized artefact of ``model`` to the folder ``path`` (replaced atomically) and return it.

    With ``tokenizer`` (anything with ``save_pretrained``) the folder also carries the tokenizer files,
    so it loads on its own (``model=local model.path=<folder>``, :func:`load_quantized`).

    The linears hold ``Q(W + delta)`` exactly as inside ``fake_quantized(model, linears, quantizer,
    deltas, calibration)``; the model itself is left unchanged. ``model`` may be PEFT-wrapped: the
    adapters are not saved, pass their merged updates as ``deltas`` and, as for ``fake_quantized``,
    disable the adapters meanwhile (GPTQ calibrates on the model's forward pass).
    """
    path = Path(path)
    bits = code_bits(quantizer)
    # Form W + delta exactly as fake_quantized does (in the weight dtype), then encode.
    with weights_restored(linears) if deltas else nullcontext():
        for name, delta in (deltas or {}).items():
            linears[name].weight.add_(delta.to(linears[name].weight.dtype))
        fields = quantizer.encode_model(model, linears, calibration)

    tensors: dict[str, Tensor] = {}
    layout: dict[str, Any] = {}
    for name, linear in linears.items():
        entry = {"shape": list(linear.weight.shape), "dtype": str(linear.weight.dtype).removeprefix("torch."), "fields": {}}
        for field, value in fields[name].items():
            tensors[f"{name}.{field}"], entry["fields"][field] = _store(value, bits)
        layout[name] = entry
    dtype = next(p.dtype for p in _hf_model(model).parameters() if p.is_floating_point())
    config = {
        "format": FORMAT,
        "version": VERSION,
        "quantizer": quantizer_config(quantizer),
        "bits": bits,
        "dtype": str(dtype).removeprefix("torch."),
        "linears": layout,
    }

    with atomic_dir(path) as tmp:  # fsynced, then swapped in: a crash never leaves a half-written artefact
        _hf_model(model).save_pretrained(tmp, state_dict=_rest_state_dict(model, set(linears)))
        save_file(tensors, tmp / QUANTIZED_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
        if tokenizer is not None:  # its files are listed, so the size report can leave them out
            before = set(tmp.iterdir())
            tokenizer.save_pretrained(str(tmp))
            config["tokenizer_files"] = sorted(p.name for p in set(tmp.iterdir()) - before)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def read_quant_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``quant_config.json`` of an artefact folder, checked for format and version."""
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: {path} is not a quantized artefact (see save_quantized)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{file} is not an {FORMAT} config")
    if config.get("version") != VERSION:
        raise ValueError(f"{file} has format version {config.get('version')}; this code reads version {VERSION}")
    for key in ("quantizer", "bits", "dtype", "linears"):
        if key not in config:
            raise ValueError(f"{file} lacks the {key!r} entry")
    return config


def _read_tensors(path: Path) -> dict[str, Tensor]:
    file = path / QUANTIZED_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the quantized weights of {path} are missing")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e


def decode_fields(path: str | os.PathLike) -> tuple[WeightQuantizer, dict[str, Tensor]]:
    """The artefact's quantizer and canonical name -> decoded float32 weight of every decoder linear."""
    path = Path(path)
    config = read_quant_config(path)
    quantizer = quantizer_from_config(config["quantizer"])
    tensors = _read_tensors(path)
    weights = {}
    for name, entry in config["linears"].items():
        payload = {}
        try:
            for field, meta in entry["fields"].items():
                key = f"{name}.{field}"
                if key not in tensors:
                    raise ValueError(f"{path / QUANTIZED_FILE} lacks the tensor {key}")
                payload[field] = _restore(tensors[key], meta, key)
            shape = entry["shape"]
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path / CONFIG_FILE}: malformed entry for {name}: {e!r}") from e
        weight = quantizer.decode_weight(payload)
        if list(weight.shape) != shape:
            raise ValueError(f"{path}: {name} decodes to shape {list(weight.shape)}, the config says {shape}")
        weights[name] = weight
    return quantizer, weights


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence the load report listing the (expected) missing decoder linear weights."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


@torch.no_grad()
def load_quantized(path: str | os.PathLike) -> nn.Module:
    """The model saved by :func:`save_quantized`, on the CPU in eval mode, with its decoder linears decoded."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    config = read_quant_config(path)
    _, weights = decode_fields(path)
    with _quiet_transformers():
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=_DTYPES[config["dtype"]], output_loading_info=True)
    linears = decoder_linears(model)
    unknown = set(weights) - set(linears)
    if unknown:
        raise ValueError(f"{path}: {CONFIG_FILE} lists {sorted(unknown)}, which are not decoder linears of the saved model")
    # Only the quantized weights may be absent from the saved model (unquantized linears are saved whole).
    missing = set(info["missing_keys"]) - {f"{name}.weight" for name in weights}
    if missing or info["mismatched_keys"]:
        raise ValueError(f"{path}: the saved model lacks {sorted(missing)} / mismatches {info['mismatched_keys']}")
    for name, weight in weights.items():
        linear = linears[name]
        if linear.weight.shape != weight.shape:
            raise ValueError(f"{path}: {name} is {tuple(linear.weight.shape)} in the model, {tuple(weight.shape)} decoded")
        linear.weight.copy_(weight.to(linear.weight.dtype))
    return model.eval()


# ---------------------------------------------------------------------------------------------
# size report
# ---------------------------------------------------------------------------------------------


def quantized_size_report(path: str | os.PathLike, model: nn.Module | None = None) -> dict[str, float | int]:
    """Bytes of the artefact against an fp16 copy of the model.

    Linear layers: packed codes, metadata (scales, zero points, tables, absmax), sparse part, and
    the same with the float32 metadata at 2 bytes (what fp16 scales would cost; not exact).
    Whole model: all files in ``path`` but the tokenizer's against 2 bytes per parameter, counted from ``model``
    (LoRA tensors excluded) if given, else from the artefact itself.
    """
    path = Path(path)
    config = read_quant_config(path)
    file = path / QUANTIZED_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: the quantized weights of {path} are missing")
    n_weights = sum(math.prod(entry["shape"]) for entry in config["linears"].values())
    stored = []
    try:
        with safe_open(file, framework="pt") as f:
            for name, entry in config["linears"].items():
                for field in entry["fields"]:
                    view = f.get_slice(f"{name}.{field}")
                    dtype = _SAFETENSORS_DTYPES[view.get_dtype()]
                    stored.append((field, math.prod(view.get_shape()) * dtype.itemsize, dtype))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    codes, meta, sparse, meta_fp32, _ = _tally(stored)

    if model is not None:
        n_params = sum(p.numel() for name, p in model.named_parameters() if ".lora_" not in name)
    else:
        n_rest = 0
        for shard in path.glob("model*.safetensors"):
            with safe_open(shard, framework="pt") as f:
                n_rest += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
        n_params = n_weights + n_rest
    linear_bytes = codes + meta + sparse
    tokenizer_files = set(config.get("tokenizer_files", ()))
    tokenizer_bytes = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name in tokenizer_files)
    total = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) - tokenizer_bytes
    return {
        "bits": config["bits"],
        "linear_weights": n_weights,
        "linear_fp16_bytes": 2 * n_weights,
        "codes_bytes": codes,
        "meta_bytes": meta,
        "sparse_bytes": sparse,
        "linear_bytes": linear_bytes,
        "linear_bits_per_weight": 8 * linear_bytes / n_weights,
        "codes_ratio": codes / (2 * n_weights),
        "linear_ratio": linear_bytes / (2 * n_weights),
        "linear_bytes_fp16_scales": linear_bytes - meta_fp32 // 2,
        "linear_ratio_fp16_scales": (linear_bytes - meta_fp32 // 2) / (2 * n_weights),
        "quantized_file_bytes": file.stat().st_size,
        "total_bytes": total,
        "tokenizer_bytes": tokenizer_bytes,
        "fp16_model_bytes": 2 * n_params,
        "total_ratio": total / (2 * n_params),
    }


def _tally(stored: list[tuple[str, int, torch.dtype]]) -> tuple[int, int, int, int, int]:
    """Bytes of (codes, metadata, sparse part, float32 metadata, float32 sparse values) from
    (field name, stored bytes, stored dtype) of every stored field."""
    codes = meta = sparse = meta_fp32 = sparse_fp32 = 0
    for field, nbytes, dtype in stored:
        if field == "codes":
            codes += nbytes
        elif field.startswith("sparse_"):
            sparse += nbytes
            sparse_fp32 += nbytes if dtype == torch.float32 else 0
        else:
            meta += nbytes
            meta_fp32 += nbytes if dtype == torch.float32 else 0
    return codes, meta, sparse, meta_fp32, sparse_fp32


def encoding_size(fields: Mapping[str, Mapping[str, Tensor]], bits: int, n_weights: int) -> dict[str, float | int]:
    """Effective bits per weight of encoded linears (canonical name -> the fields ``encode_model`` returns).

    Each field is counted in the form :func:`save_quantized` stores it (bit-packed codes, float32 or exact
    half-precision floats, int32 positions), so ``bits_per_weight`` equals the artefact's
    ``linear_bits_per_weight``: dense codes + scales / zero points / tables + sparse values and positions,
    over the ``n_weights`` weights of these linears. ``bits_per_weight_16bit_floats`` counts every float32
    field (scales, tables, sparse values) at 2 bytes, as papers usually count fp16 scales and values.
    """
    stored = []
    for payload in fields.values():
        for field, value in payload.items():
            t, _ = _store(value, bits)
            stored.append((field, t.numel() * t.element_size(), t.dtype))
    codes, meta, sparse, meta_fp32, sparse_fp32 = _tally(stored)
    total = codes + meta + sparse
    entries = sum(int(p["sparse_index"].numel()) for p in fields.values() if "sparse_index" in p)
    return {
        "codes_bytes": codes, "meta_bytes": meta, "sparse_bytes": sparse, "linear_bytes": total,
        "linear_weights": n_weights, "sparse_entries": entries,
        "sparse_percent": 100 * entries / n_weights if n_weights else 0.0,
        "bits_per_weight": 8 * total / n_weights if n_weights else 0.0,
        "bits_per_weight_16bit_floats": 8 * (total - (meta_fp32 + sparse_fp32) // 2) / n_weights if n_weights else 0.0,
    }
