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
  points) are bit-packed at the quantizer's ``bits`` (:func:`pack_bits`), a llama.cpp file type's tensors each
  at their own ggml type's;
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

from npft_lightning.core.io import atomic_dir
from npft_lightning.core.layers import canonical_name, decoder_linears
from npft_lightning.core.restore import weights_restored
from npft_lightning.quant.base import WeightQuantizer
from npft_lightning.quant.packing import (
    SAFETENSORS_DTYPES,
    STORED_DTYPES,
    code_bits,
    from_stored_form,
    stored_form,
    tally_bytes,
)

FORMAT = "npft-quantized"
VERSION = 1
QUANTIZED_FILE = "quantized.safetensors"
CONFIG_FILE = "quant_config.json"

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
        width = code_bits(quantizer, name)  # a llama.cpp file type's tensors each at their own type's width
        for field, value in fields[name].items():
            tensors[f"{name}.{field}"], entry["fields"][field] = stored_form(value, width)
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
                payload[field] = from_stored_form(tensors[key], meta, key)
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
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=STORED_DTYPES[config["dtype"]], output_loading_info=True)
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
                    dtype = SAFETENSORS_DTYPES[view.get_dtype()]
                    stored.append((field, math.prod(view.get_shape()) * dtype.itemsize, dtype))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file: {e}") from e
    codes, meta, sparse, meta_fp32, _ = tally_bytes(stored)

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




