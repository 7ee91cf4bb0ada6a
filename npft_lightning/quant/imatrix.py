"""Importance matrix ("imatrix"): per decoder linear, the mean over tokens of each input column's square.

    python eval.py llamacpp_types=[Q4_K_M] imatrix=true gguf_out=model.gguf   # also writes model.imatrix.gguf

llama.cpp weights its quantizers' rounding error per input column by this vector (``quant_weights`` in
ggml-quants.c). Computed here as llama.cpp's ``imatrix`` tool computes it (tools/imatrix/imatrix.cpp in
the vendored source), so the two are interchangeable:

* an entry per matrix multiplication whose weight is a ``blk.*`` tensor: the decoder linears, named by
  their GGUF tensors (``blk.0.attn_q.weight``); ``output.weight`` only with the tool's
  ``--process-output``, so not here. q / k / v (and gate / up) read the same input: equal entries. The
  row permutation of q / k in the GGUF does not touch columns;
* per entry, Σ over tokens of x_j² for every input column j, and the number of tokens (rows of the
  activation) as its count; a dense tensor has one count (an MoE expert tensor one per expert: not a
  llama model's case);
* the GGUF format, the default of this version's tool: tensors ``<name>.in_sum2`` (the raw sums, F32)
  and ``<name>.counts`` (F32) per entry in name order, keys ``general.type=imatrix``,
  ``imatrix.datasets``, ``imatrix.chunk_count`` (windows) and ``imatrix.chunk_size`` (tokens per window);
* the legacy ``.dat`` (``--output-format dat``): int32 entry count; per entry in name order int32 name
  length, name, int32 ``ncall`` = ⌈count / chunk size⌉, int32 value count, float32 ``sum / count * ncall``;
  then int32 chunk count and the dataset name (int32 length + bytes);
* what ``llama-quantize --imatrix`` hands ``llama_model_quantize``: ``sum / count`` (GGUF) or
  ``value / ncall`` (.dat), i.e. :meth:`ImportanceMatrix.means`.

Sums are accumulated in float64 here (the tool adds float32 sequentially: the two agree to float32
rounding).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.io import atomic_file
from npft_lightning.core.layers import decoder_linears

LEGACY_SUFFIX = ".dat"  # any other suffix: the GGUF format (what this llama.cpp version's tool writes by default)


@dataclass
class ImportanceMatrix:
    """Raw sums of squared inputs per GGUF weight name, with their token counts and how they were collected."""

    sums: dict[str, Tensor]  # GGUF weight name -> [in_features] float64, Σ over tokens of x²
    counts: dict[str, int]  # GGUF weight name -> tokens seen
    chunk_size: int  # tokens per calibration window
    chunks: int  # calibration windows
    datasets: list[str] = field(default_factory=list)

    def means(self) -> dict[str, Tensor]:
        """GGUF weight name -> float32 mean of x² per input column: what llama.cpp's quantizer is given."""
        return {name: (s / self.counts[name]).float() for name, s in self.sums.items() if self.counts[name] > 0}

    def state(self) -> dict:
        """Tensors, numbers and strings only (a checkpoint entry that loads with ``weights_only``)."""
        return {"sums": dict(self.sums), "counts": dict(self.counts), "chunk_size": self.chunk_size, "chunks": self.chunks,
                "datasets": list(self.datasets)}

    @classmethod
    def from_state(cls, state: dict) -> ImportanceMatrix:
        return cls(dict(state["sums"]), {k: int(v) for k, v in state["counts"].items()}, int(state["chunk_size"]),
                   int(state["chunks"]), list(state.get("datasets", [])))


@torch.no_grad()
def collect_imatrix(model: nn.Module, windows: Iterable[Tensor], gguf_names: dict[str, str], dataset: str = "") -> ImportanceMatrix:
    """The importance matrix of ``model`` on ``windows`` (batches of token ids [batch, length]).

    ``gguf_names`` maps each canonical decoder-linear name to its GGUF weight name
    (:func:`npft_lightning.quant.gguf_export.gguf_linear_names`); forward pre-hooks on those linears add up
    the squared inputs of every token.
    """
    linears = decoder_linears(model)
    sums = {gguf_names[name]: torch.zeros(lin.in_features, dtype=torch.float64) for name, lin in linears.items()}
    counts = dict.fromkeys(sums, 0)

    def hook_for(entry: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[entry] += x.square().sum(0).cpu()
            counts[entry] += x.shape[0]
        return hook

    handles = [lin.register_forward_pre_hook(hook_for(gguf_names[name])) for name, lin in linears.items()]
    device = next(model.parameters()).device
    chunks = chunk_size = 0
    try:
        for batch in windows:
            stop_if_interrupted()
            model(input_ids=batch.to(device))
            chunks += batch.shape[0]
            chunk_size = batch.shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return ImportanceMatrix(sums, counts, chunk_size, chunks, [dataset] if dataset else [])


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def write_imatrix(imatrix: ImportanceMatrix, path: str | os.PathLike) -> Path:
    """Write ``imatrix`` where ``llama-quantize --imatrix`` reads it: ``.dat`` in the legacy format, else GGUF; atomic."""
    path = Path(path)
    with atomic_file(path) as tmp:
        (_write_dat if path.suffix == LEGACY_SUFFIX else _write_gguf)(imatrix, tmp)
    return path


def _write_gguf(imatrix: ImportanceMatrix, path: Path) -> None:
    from gguf import GGUFType, GGUFWriter, Keys

    writer = GGUFWriter(path, "llama")
    try:
        writer.add_type(GGUFType.IMATRIX)
        # llama-quantize refuses a GGUF imatrix without this key, and the gguf package writes no empty array.
        writer.add_array(Keys.IMatrix.DATASETS, list(imatrix.datasets) or ["(unnamed)"])
        writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, imatrix.chunks)
        writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):  # the tool's order; 1-D like its [ncols, 1] and [1, 1] tensors
            writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].float().numpy())
            writer.add_tensor(f"{name}.counts", np.array([imatrix.counts[name]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_dat(imatrix: ImportanceMatrix, path: Path) -> None:
    names = [name for name in sorted(imatrix.sums) if imatrix.counts[name] > 0]  # the tool skips entries without data
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(names)))
        for name in names:
            ncall = math.ceil(imatrix.counts[name] / max(imatrix.chunk_size, 1))
            values = (imatrix.sums[name] / imatrix.counts[name] * ncall).float().numpy()
            encoded = name.encode()
            f.write(struct.pack("<i", len(encoded)) + encoded + struct.pack("<ii", ncall, values.size))
            f.write(values.astype("<f4").tobytes())
        dataset = (imatrix.datasets[-1] if imatrix.datasets else "").encode()
        f.write(struct.pack("<ii", imatrix.chunks, len(dataset)) + dataset)


def read_imatrix(path: str | os.PathLike) -> ImportanceMatrix:
    """An imatrix file of either format (llama.cpp's loader: GGUF when it parses as GGUF, else legacy)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise UserError(f"imatrix file {path} cannot be read ({err.strerror or err})") from err
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: Path) -> ImportanceMatrix:
    from gguf import GGUFReader, Keys

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError, struct.error) as err:
        raise UserError(f"imatrix file {path} starts like a GGUF file but cannot be read as one ({err})") from err
    sums, counts = {}, {}
    for tensor in reader.tensors:
        data = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
        if tensor.name.endswith(".in_sum2"):
            sums[tensor.name.removesuffix(".in_sum2")] = torch.from_numpy(data.astype(np.float64))
        elif tensor.name.endswith(".counts"):
            if data.size != 1:
                raise UserError(f"imatrix file {path}: {tensor.name} has {data.size} counts (an MoE imatrix); "
                                f"only dense models' imatrices are read")
            counts[tensor.name.removesuffix(".counts")] = int(round(float(data[0])))
    if not sums:
        raise UserError(f"imatrix file {path} is a GGUF file without importance entries (no <tensor>.in_sum2): a model, "
                        f"not an imatrix; give the file llama-imatrix or eval.py imatrix=true wrote")
    if set(sums) != set(counts):
        raise UserError(f"imatrix file {path}: sums and counts do not pair up ({sorted(set(sums) ^ set(counts))[:3]})")

    def field_value(key, default):
        return reader.fields[key].contents() if key in reader.fields else default

    return ImportanceMatrix(sums, counts, int(field_value(Keys.IMatrix.CHUNK_SIZE, 0)),
                            int(field_value(Keys.IMatrix.CHUNK_COUNT, 0)), list(field_value(Keys.IMatrix.DATASETS, [])))


def _read_dat(path: Path) -> ImportanceMatrix:
    """The legacy format stores ``mean * ncall`` with ``ncall`` chunks: read back as sums over ``ncall`` chunks of
    the file's chunk size, which llama.cpp does not store; chunk size 1 keeps ``sum / count`` = the mean."""
    data = path.read_bytes()
    offset = 0

    def take(fmt: str):
        nonlocal offset
        values = struct.unpack_from(fmt, data, offset)
        offset += struct.calcsize(fmt)
        return values

    try:
        (entries,) = take("<i")
        sums, counts = {}, {}
        for _ in range(entries):
            (length,) = take("<i")
            name = data[offset:offset + length].decode()
            offset += length
            ncall, nval = take("<ii")
            values = np.frombuffer(data, dtype="<f4", count=nval, offset=offset).astype(np.float64)
            offset += 4 * nval
            sums[name], counts[name] = torch.from_numpy(values.copy()), ncall
        chunks, datasets = 0, []
        if offset < len(data):
            chunks, length = take("<ii")
            datasets = [data[offset:offset + length].decode()] if length > 0 else []
    except (struct.error, ValueError, UnicodeDecodeError) as err:
        raise UserError(f"imatrix file {path} is neither a GGUF nor a legacy .dat imatrix ({err})") from err
    if not sums:
        raise UserError(f"imatrix file {path} holds no entries; give the file llama-imatrix or eval.py imatrix=true wrote")
    return ImportanceMatrix(sums, counts, 1, chunks, datasets)


def check_imatrix_fits(imatrix: ImportanceMatrix, in_features: Mapping[str, int], key: str) -> None:
    """One line when ``imatrix`` was computed for another model: an entry whose length is not its tensor's input
    features, or no entry for any of the model's decoder linears. ``in_features``: GGUF weight name -> input features
    of each decoder linear; ``key``: the option that named the imatrix, for the message."""
    matched = sorted(name for name in in_features if name in imatrix.sums)
    for name in matched:
        if imatrix.sums[name].numel() != in_features[name]:
            raise UserError(f"{key}: its entry {name} has {imatrix.sums[name].numel()} values, but the model's {name} has "
                            f"{in_features[name]} input features; the imatrix was computed for another model")
    if not matched:
        shown = ", ".join(sorted(imatrix.sums)[:2])
        raise UserError(f"{key}: none of its {len(imatrix.sums)} entries ({shown}, ...) is a decoder linear of this model "
                        f"({min(in_features)}, ...); the imatrix was computed for another model")
