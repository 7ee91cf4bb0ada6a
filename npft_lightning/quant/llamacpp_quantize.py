"""llama.cpp's own quantizer, ``llama_model_quantize``, run on a float GGUF through llama-cpp-python's ctypes API.

    python eval.py llamacpp_types=[Q4_0,Q4_K_M,IQ4_XS] imatrix=both gguf_out=smollm2.gguf

What a user ships is a file made by this function (``llama-quantize`` is a thin wrapper of it): it picks
a ggml type per tensor from the file type (``llama_tensor_get_type`` in src/llama-quant.cpp: a
``Q4_K_M`` file holds Q4_K and Q6_K tensors, its ``output`` / tied embedding Q6_K), falls back to
another type where a type's blocks do not divide a tensor's rows (both rules, and so the types expected
here, come from :mod:`~npft_lightning.quant.llamacpp_rules`, as the fake-quant twins' do), and weights
each tensor's rounding by the importance matrix when it is given one (:mod:`npft_lightning.quant.imatrix`).
The file is written to a temporary name beside the target and renamed into place: a failed
quantization leaves nothing behind (llama.cpp itself writes straight into its output file).
"""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from npft_lightning.core.errors import UserError
from npft_lightning.core.io import atomic_file
from npft_lightning.quant import llamacpp_rules
from npft_lightning.quant.gguf_export import gguf_size_report
from npft_lightning.quant.imatrix import ImportanceMatrix
from npft_lightning.quant.llamacpp import require_llama_cpp
from npft_lightning.quant.llamacpp_rules import (
    block_size,
    fallback_type,
    linear_types,
    llama_ftype,
)


@dataclass(frozen=True)
class FileType:
    ftype: int  # llama.h's LLAMA_FTYPE_MOSTLY_*
    linear_types: tuple[str, ...]  # the ggml types it gives a llama model's decoder linears, its default first


# The file types llama.cpp quantizes without an importance matrix, from llama.cpp's rules (llamacpp_rules): the
# linear types only name the fallbacks a model's shapes would cause before it loads; the file's real per-tensor
# types are read back.
FILE_TYPES: dict[str, FileType] = {
    name: FileType(llama_ftype(name), tuple(t.upper() for t in linear_types(name))) for name in llamacpp_rules.FILE_TYPES
}
UNQUANTIZED = "F16"


def file_type(name: str, key: str = "llamacpp_types") -> FileType:
    """The :class:`FileType` called ``name`` (case-insensitive); a one-line UserError listing the valid ones."""
    found = FILE_TYPES.get(str(name).upper())
    if found is None:
        raise UserError(f"{key}: {name!r} is not a llama.cpp file type this quantizer writes; choose from "
                        f"{', '.join(FILE_TYPES)}")
    return found


def fallbacks(name: str, columns: Iterable[int]) -> dict[tuple[str, int], str]:
    """``(ggml type, row length) -> the type llama.cpp writes instead`` for the types of file type ``name`` whose
    blocks do not divide one of the decoder linears' row lengths ``columns`` (their input features)."""
    out = {}
    for ggml_type in file_type(name).linear_types:
        for n in sorted(set(columns)):
            written = fallback_type(ggml_type.lower(), n).upper()
            if written != ggml_type:
                out[ggml_type, n] = written
    return out


def check_columns(name: str, columns: Iterable[int], key: str = "llamacpp_types") -> str | None:
    """A one-line note on the fallbacks of file type ``name`` for decoder linears with ``columns`` input features
    (None: none); a UserError where llama.cpp would leave a layer unquantized (F16)."""
    found = fallbacks(name, columns)
    if not found:
        return None
    unquantized = sorted({n for (_, n), fallback in found.items() if fallback == UNQUANTIZED})
    if unquantized:
        ggml_type = next(t for (t, n), f in found.items() if f == UNQUANTIZED)
        raise UserError(f"{key}: {name.upper()} cannot quantize the decoder linears with {unquantized[0]} input features: "
                        f"{ggml_type}'s {block_size(ggml_type.lower())}-wide blocks (and any fallback) do not divide {unquantized[0]}, "
                        f"so llama.cpp would store them as {UNQUANTIZED}; drop {name.upper()} or use a model whose widths are "
                        f"multiples of 32")
    widths: dict[tuple[str, str], list[int]] = {}
    for (ggml_type, n), fallback in found.items():
        widths.setdefault((ggml_type, fallback), []).append(n)
    parts = [f"{t} -> {f} for {' and '.join(map(str, ns))} input features" for (t, f), ns in widths.items()]
    return (f"{key}: {name.upper()} falls back where a type's blocks do not divide a decoder linear's rows "
            f"(llama.cpp's rule): {', '.join(parts)}")


# ---------------------------------------------------------------------------------------------
# the quantizer
# ---------------------------------------------------------------------------------------------


@contextmanager
def _llama_log(llama_cpp) -> Iterator[list[str]]:
    """Collect llama.cpp's log lines instead of printing them (a quantization logs a line per tensor)."""
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level: int, text: bytes, user_data) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def _imatrix_entries(llama_cpp, means: dict[str, torch.Tensor]) -> tuple[Any, list]:
    """The NULL-terminated ``llama_model_imatrix_data`` array of ``means``, and the buffers it points into."""
    entries = (llama_cpp.llama_model_imatrix_data * (len(means) + 1))()
    buffers = []
    for entry, (name, values) in zip(entries, sorted(means.items())):
        data = np.ascontiguousarray(values.detach().cpu().float().numpy())
        buffers.append(data)
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    return entries, buffers


def _kv_overrides(llama_cpp, values: dict[str, str | int]) -> Any:
    """The key-terminated ``llama_model_kv_override`` array of ``values`` (strings and integers)."""
    overrides = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for override, (key, value) in zip(overrides, values.items()):
        override.key = key.encode()
        if isinstance(value, str):
            override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR
            override.value.val_str = value.encode()[:127]  # llama-quantize's strncpy of 127
        else:
            override.tag = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT
            override.value.val_i64 = int(value)
    return overrides


def imatrix_metadata(imatrix: ImportanceMatrix, imatrix_file: str | os.PathLike | None) -> dict[str, str | int]:
    """The ``quantize.imatrix.*`` keys ``llama-quantize --imatrix <file>`` writes into the quantized file."""
    keys: dict[str, str | int] = {}
    if imatrix_file is not None:
        keys["quantize.imatrix.file"] = str(imatrix_file)
    if imatrix.datasets:
        keys["quantize.imatrix.dataset"] = imatrix.datasets[0]
    keys["quantize.imatrix.entries_count"] = len(imatrix.means())
    if imatrix.chunks > 0:
        keys["quantize.imatrix.chunks_count"] = imatrix.chunks
    return keys


def quantize_gguf(source: str | os.PathLike, target: str | os.PathLike, name: str, imatrix: ImportanceMatrix | None = None,
                  imatrix_file: str | os.PathLike | None = None, threads: int | None = None) -> dict[str, Any]:
    """Quantize the float GGUF ``source`` to file type ``name`` (e.g. ``Q4_K_M``) at ``target`` with llama.cpp;
    returns the size report of the file (:func:`~npft_lightning.quant.gguf_export.gguf_size_report`).

    With ``imatrix``, its means weight the quantization and the ``quantize.imatrix.*`` keys name it (and the
    file it was written to, ``imatrix_file``), as ``llama-quantize --imatrix`` does.
    """
    llama_cpp = require_llama_cpp("llamacpp_types")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = file_type(name).ftype
    params.nthread = int(threads or torch.get_num_threads())
    keep_alive = []
    if imatrix is not None:
        entries, buffers = _imatrix_entries(llama_cpp, imatrix.means())
        overrides = _kv_overrides(llama_cpp, imatrix_metadata(imatrix, imatrix_file))
        keep_alive += [entries, buffers, overrides]
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        params.kv_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_kv_override))
    target = Path(target)
    with atomic_file(target) as tmp, _llama_log(llama_cpp) as log:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:  # atomic_file deletes the half-written temporary
            reason = next((line.split("failed to quantize:", 1)[1].strip() for line in log if "failed to quantize:" in line),
                          (log[-1].strip() if log else "no reason given"))
            raise UserError(f"llama.cpp could not quantize {source} to {name.upper()}: {reason}")
    del keep_alive
    report = gguf_size_report(target)
    report["file_type"] = name.upper()
    report["imatrix"] = imatrix is not None
    return report
