"""GPTQ (Frantar et al., 2022): one-shot second-order weight quantization on the RTN grid.

Each layer minimises ``||X W^T - X Ŵ^T||²`` over the calibration inputs X: columns are rounded
one at a time and the not-yet-rounded columns absorb the rounding error through the inverse
Hessian ``H = 2/n Σ x xᵀ``. The grid is the RTN grid of :mod:`npft_lightning.quant.rtn` (same
bits / sym / group semantics), so a GPTQ weight is a valid RTN encoding and exports the same way.

Numerics: the Hessian is accumulated with fp32 matmuls (TF32 off) into a float64 sum; the
solve (damping, Cholesky, column loop) runs in float64; scales and zeros come from
``rtn_params`` (float32) and the returned weight is float32.

Groups (``group_size``): a group is always ``group_size`` *contiguous input columns in the
original order*, exactly as in RTN, so no column-permutation index (``g_idx``) is needed to
decode. Its scale / zero are computed

* ``static_groups=False`` (default): just before the first of its columns is rounded, from the
  current, error-updated values of all its columns. Without act-order this is the reference's
  dynamic grouping (the reference reads stale in-block values when ``group_size < block_size``;
  we apply the pending in-block updates first). With act-order the group's columns are spread
  over the processing order; the same rule still applies (its first processed column triggers it).
* ``static_groups=True``: up front from the original weights (the reference ``--static-groups``).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.layers import block_index, decoder_blocks
from npft_lightning.core.restore import weights_restored
from npft_lightning.quant.base import WeightQuantizer, is_int
from npft_lightning.quant.rtn import rtn_decode, rtn_params
from npft_lightning.quant.uniform import decode_rtn_fields, default_name


class GPTQCodes(NamedTuple):
    """Integer codes [rows, cols] (uint8, original column order), scale / zero [rows, n_groups] (float32).

    ``perm`` is the processing order (act-order) or None; it is informational only: the codes
    decode with :func:`~npft_lightning.quant.rtn.rtn_decode` without it.
    """

    codes: Tensor
    scale: Tensor
    zero: Tensor
    perm: Tensor | None


@contextmanager
def no_tf32() -> Iterator[None]:
    """fp32 matmuls at full precision inside the block (the reference disables TF32 too)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _upper_cholesky_of_inverse(hessian: Tensor, percdamp: float) -> Tensor:
    """Upper Cholesky factor of ``(H + damp·I)^-1``; the damping grows ×10 if H is not positive definite."""
    eye = torch.eye(hessian.shape[0], dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal().mean()
    damp = percdamp * mean_diag
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(hessian + damp * eye)
        if info == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if info == 0:
                return upper
        damp = torch.clamp(damp * 10, min=1e-6 * mean_diag)
        warnings.warn(f"GPTQ: Hessian not positive definite, retrying with damping {float(damp):.3g}", stacklevel=3)
    raise RuntimeError("GPTQ: Hessian stays singular even with strong damping; are the calibration inputs all zero?")


class RTNGrid:
    """The grid of a GPTQ pass on the RTN grid: per row and group a scale and zero (``rtn_params``), set up front
    (per channel, static groups) or by :meth:`set_group` from a group's current values (dynamic groups)."""

    def __init__(self, weight: Tensor, bits: int, group_size: int | None, sym: bool, static_groups: bool) -> None:
        rows, cols = weight.shape
        n_groups = 1 if group_size is None else cols // group_size
        self.bits, self.sym, self.maxq = bits, sym, 2**bits - 1
        self.dynamic = group_size is not None and not static_groups
        if self.dynamic:
            self.scale = torch.zeros(rows, n_groups, dtype=torch.float32, device=weight.device)
            self.zero = torch.zeros_like(self.scale)
        else:  # per-channel: whole (dead-zeroed) rows; static groups: original contiguous groups
            self.scale, self.zero = rtn_params(weight, bits, group_size, sym)
        self._in_use: dict[int, tuple[Tensor, Tensor]] = {}  # float64 (scale, zero) of each group in use

    def set_group(self, group: int, current: Tensor) -> None:
        s, z = rtn_params(current, self.bits, None, self.sym)
        self.scale[:, group], self.zero[:, group] = s[:, 0], z[:, 0]

    def round(self, w: Tensor, group: int, column: int) -> tuple[Tensor, Tensor]:
        """(codes, grid values) of one column ``w`` [rows] float64 of ``group`` (``column``: its index in the group)."""
        if group not in self._in_use:
            self._in_use[group] = self.scale[:, group].double(), self.zero[:, group].double()
        s, z = self._in_use[group]
        q = torch.clamp(torch.round(w / s) + z, 0, self.maxq)
        return q, s * (q - z)


def gptq_codes(
    weight: Tensor,
    hessian: Tensor,
    make_grid: Callable[[Tensor], Any],
    group_size: int | None,
    act_order: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    keep: Tensor | None = None,
) -> tuple[Tensor, Tensor | None, Any]:
    """The GPTQ column loop on any grid: ``(codes [out, in] uint8 in the original column order, perm or None, the grid)``.

    ``make_grid(W)`` builds the grid from the (dead-column-zeroed, kept-entries-zeroed) float64 weight: an object
    with ``dynamic`` (whether each group's grid is set from its current values when its first column comes up),
    ``set_group(group, current [out, group_size])`` and ``round(w [out], group, column) -> (codes, values)``.
    """
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match the {cols} input features")
    if group_size is not None and (group_size <= 0 or cols % group_size != 0):
        raise ValueError(f"group_size={group_size} does not divide the {cols} input features; pick a divisor of {cols}")
    g = cols if group_size is None else group_size
    n_groups = cols // g

    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(device=W.device, dtype=torch.float64).clone()
    # A column that never sees a non-zero input cannot affect the output: zero it, keep H invertible.
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    keep = None if keep is None or not bool(keep.any()) else keep.to(W.device) & ~dead[None, :]
    exact = None if keep is None else W.clone()  # the values kept entries return to

    grid = make_grid(W if keep is None else W.masked_fill(keep, 0))
    ready = [not grid.dynamic] * n_groups

    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(cols, device=W.device)
    if act_order:
        W, H = W[:, perm], H[perm][:, perm]
        if keep is not None:
            keep, exact = keep[:, perm], exact[:, perm]
    inv_perm = torch.argsort(perm)
    group_of_pos = (perm // g).tolist()  # group of each processing position
    column_of_pos = (perm % g).tolist()  # its index within the group
    positions_of_group = inv_perm.reshape(n_groups, g).sort(dim=1).values  # processing positions of each group

    Hinv = _upper_cholesky_of_inverse(H, percdamp)
    codes = torch.zeros(rows, cols, dtype=torch.uint8, device=W.device)

    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()  # this block's columns, kept up to date column by column
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            grp = group_of_pos[i1 + i]
            if not ready[grp]:
                # First column of this group: its grid from the group's current values. Columns past
                # this block still miss the in-block updates (lazy batching); apply them here.
                pos = positions_of_group[grp]
                inside = pos < i2
                current = torch.empty(rows, g, dtype=W.dtype, device=W.device)
                current[:, inside] = W1[:, pos[inside] - i1]
                later = pos[~inside]
                current[:, ~inside] = W[:, later] - Err1 @ Hinv[i1:i2, later]
                if keep is not None:
                    current.masked_fill_(keep[:, pos], 0)
                grid.set_group(grp, current)
                ready[grp] = True
            w = W1[:, i]
            q, target = grid.round(w, grp, column_of_pos[i1 + i])
            codes[:, i1 + i] = q.to(torch.uint8)
            if keep is not None:
                target = torch.where(keep[:, i1 + i], exact[:, i1 + i], target)
            err = (w - target) / Hinv1[i, i]
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)  # the remaining columns absorb the error
            Err1[:, i] = err
        # Lazy batch update: the columns after this block absorb its errors in one matmul.
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    return codes[:, inv_perm], (perm if act_order else None), grid


def gptq_encode_matrix(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    act_order: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
    keep: Tensor | None = None,
) -> GPTQCodes:
    """GPTQ-quantize one weight matrix [out, in] given its input Hessian [in, in]; returns the codes.

    ``keep`` (bool [out, in]): entries that stay at their original value (the sparse part of a
    dense-and-sparse split). They take no part in the grid ranges (counted as 0, always on the grid),
    and each one's "rounding" is to its original value, so the error compensation absorbed there
    on the way is passed on to the later columns like any rounding error. Their codes are meaningless.
    """
    codes, perm, grid = gptq_codes(weight, hessian, lambda w: RTNGrid(w, bits, group_size, sym, static_groups), group_size,
                                   act_order, block_size, percdamp, keep)
    return GPTQCodes(codes, grid.scale, grid.zero, perm)


def gptq_quantize_matrix(
    weight: Tensor,
    hessian: Tensor,
    bits: int,
    group_size: int | None = None,
    sym: bool = False,
    act_order: bool = True,
    block_size: int = 128,
    percdamp: float = 0.01,
    static_groups: bool = False,
) -> Tensor:
    """GPTQ fake-quantized copy of ``weight`` [out, in] (float32): every value is a point of its row/group's RTN grid."""
    enc = gptq_encode_matrix(weight, hessian, bits, group_size, sym, act_order, block_size, percdamp, static_groups)
    return rtn_decode(enc.codes, enc.scale, enc.zero, group_size)


class HessianAccumulator:
    """``H = 2/n Σ x xᵀ`` over all input rows (tokens) a Linear sees; fp32 matmuls, float64 sum."""

    def __init__(self, in_features: int, device: torch.device):
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: Tensor) -> None:
        self.add_product(*self.product(x, self.sum.device))

    @staticmethod
    def product(x: Tensor, device: torch.device) -> tuple[Tensor, int]:
        """``(x xᵀ summed over rows, in float64; the number of rows)``: what :meth:`add` adds for one input."""
        x = x.detach().reshape(-1, x.shape[-1]).to(device=device, dtype=torch.float32)
        return (x.T @ x).double(), x.shape[0]

    def add_product(self, product: Tensor, rows: int) -> None:
        self.sum += product
        self.count += rows

    def hessian(self) -> Tensor:
        if self.count == 0:
            raise RuntimeError("GPTQ: a linear layer saw no calibration input; is it used in the forward pass?")
        return self.sum * (2.0 / self.count)


# True-sequential stages inside one block, by leaf name (LLaMA/Mistral/Qwen and OPT names).
_STAGES = {
    "q_proj": 0, "k_proj": 0, "v_proj": 0,
    "o_proj": 1, "out_proj": 1,
    "gate_proj": 2, "up_proj": 2, "fc1": 2,
    "down_proj": 3, "fc2": 3,
}
_LAST_STAGE = max(_STAGES.values()) + 1  # unknown leaves go last


def sequential_stages(names: list[str]) -> list[list[str]]:
    """Group one block's linear names as [q,k,v] -> [o] -> [gate,up / fc1] -> [down / fc2] (-> unknown)."""
    stages: dict[int, list[str]] = {}
    for name in names:
        stages.setdefault(_STAGES.get(name.rsplit(".", 1)[-1], _LAST_STAGE), []).append(name)
    return [stages[k] for k in sorted(stages)]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once it has recorded what it needs."""


def _same(a: Any, b: Any) -> bool:
    """Structural equality of captured forward kwargs (to share identical ones between batches)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool)) and a == b)


def capture_block_inputs(
    model: nn.Module, block: nn.Module, calibration: Tensor, batch_size: int
) -> list[tuple[Tensor, tuple, dict[str, Any]]]:
    """(hidden_states, extra args, kwargs) entering ``block`` for each batch of calibration windows.

    A forward pre-hook records the call and stops the forward, so nothing after the embeddings
    runs. The KV cache is switched off. Identical kwargs (mask, positions, rotary embeddings)
    are shared between batches to save memory.
    """
    captured: list[tuple[Tensor, tuple, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        for key in ("past_key_values", "past_key_value"):
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        if captured and _same(captured[-1][1:], (args[1:], kwargs)):
            args, kwargs = captured[-1][1], captured[-1][2]
        else:
            args = args[1:]
        captured.append((hidden, args, kwargs))
        raise _StopForward

    device = next(model.parameters()).device
    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, calibration.shape[0], batch_size):
            stop_if_interrupted()
            try:
                model(input_ids=calibration[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def run_block(block: nn.Module, inputs: list[tuple[Tensor, tuple, dict[str, Any]]]) -> list[Tensor]:
    """The block's output hidden states for every captured batch."""
    outputs = []
    for hidden, args, kwargs in inputs:
        out = block(hidden, *args, **kwargs)
        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return outputs


class GPTQ(WeightQuantizer):
    """GPTQ on the RTN grid, calibrated block by block on token windows (see the module docstring).

    ``act_order=True, true_sequential=True`` is the default (best on SmolLM2); the plain
    reference behaviour is ``act_order=False, true_sequential=False``.
    """

    needs_calibration = True

    def __init__(
        self,
        bits: int = 4,
        group_size: int | None = None,
        sym: bool = False,
        act_order: bool = True,
        true_sequential: bool = True,
        block_size: int = 128,
        percdamp: float = 0.01,
        name: str | None = None,
        static_groups: bool = False,
        batch_size: int = 8,
    ):
        if not (is_int(bits) and 2 <= bits <= 8):
            raise ValueError(f"quant bits={bits} is outside 2..8; use a value from 2 to 8")
        if group_size is not None and not (is_int(group_size) and group_size > 0):
            raise ValueError(f"quant group_size={group_size} must be a positive divisor of the input features, or null")
        for key, value in (("block_size", block_size), ("batch_size", batch_size)):
            if not (is_int(value) and value > 0):
                raise ValueError(f"quant {key}={value} must be an integer >= 1")
        if not (isinstance(percdamp, (int, float)) and not isinstance(percdamp, bool) and math.isfinite(percdamp) and percdamp >= 0):
            raise ValueError(f"quant percdamp={percdamp} must be a finite number >= 0 (the Hessian damping, e.g. 0.01)")
        self.bits = int(bits)
        self.group_size = None if group_size is None else int(group_size)
        self.sym = bool(sym)
        self.act_order = bool(act_order)
        self.true_sequential = bool(true_sequential)
        self.block_size = int(block_size)
        self.percdamp = float(percdamp)
        self.static_groups = bool(static_groups)
        self.batch_size = int(batch_size)
        # Canonical name -> bool mask of entries kept at their exact value (set by a dense-and-sparse wrapper).
        self.kept: dict[str, Tensor] | None = None
        if name is None:
            name = default_name("gptq", self.bits, self.group_size, self.sym)
            if not self.act_order:
                name += "_noact"
            if not self.true_sequential:
                name += "_noseq"
            if self.static_groups and self.group_size is not None:
                name += "_static"
        self.name = name

    @property
    def grid_name(self) -> str:
        """The weight-local quantizer of the same grid (its ``quant`` config name): what the ``quant_error`` noise
        can target in GPTQ's stead (GPTQ itself needs calibration activations)."""
        return default_name("rtn", self.bits, self.group_size, self.sym)

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        raise NotImplementedError("GPTQ needs calibration activations: call quantize_model(model, linears, calibration)")

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        raise NotImplementedError("GPTQ needs calibration activations: call encode_model(model, linears, calibration)")

    def encode_matrix(self, weight: Tensor, hessian: Tensor, keep: Tensor | None = None) -> GPTQCodes:
        """This quantizer's settings applied to one matrix and its Hessian: the codes."""
        return gptq_encode_matrix(
            weight, hessian, self.bits, self.group_size, self.sym, self.act_order,
            self.block_size, self.percdamp, self.static_groups, keep,
        )

    def matrix_fields(self, weight: Tensor, hessian: Tensor, keep: Tensor | None = None, name: str | None = None) -> dict[str, Tensor]:
        """The stored fields of one matrix (``name``: its canonical name; what :meth:`decode_weight` reads): RTN codes,
        scale and zero."""
        enc = self.encode_matrix(weight, hessian, keep)
        return {"codes": enc.codes, "scale": enc.scale, "zero": enc.zero}

    def quantize_matrix(self, weight: Tensor, hessian: Tensor) -> Tensor:
        """This quantizer's settings applied to one matrix and its Hessian: the float32 weight (a subclass's own grid too)."""
        return self.decode_weight(self.matrix_fields(weight, hessian))

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        """Float32 weight from RTN-grid fields ``codes`` / ``scale`` / ``zero`` (no permutation needed)."""
        return decode_rtn_fields(payload, self.group_size)

    def _hessians(
        self, block: nn.Module, inputs: list[tuple[Tensor, tuple, dict[str, Any]]], linears: Mapping[str, nn.Linear]
    ) -> dict[str, Tensor]:
        """Run the block on all calibration batches and return each linear's input Hessian.

        A batch's forward stops as soon as every linear of ``linears`` has seen its input, so an
        early stage (q, k, v) does not pay for the rest of the block.
        """
        accumulators = {name: HessianAccumulator(lin.in_features, lin.weight.device) for name, lin in linears.items()}
        pending: set[str] = set()
        # This batch's inputs and their products: q, k and v (gate and up) read the same tensor, so its product is
        # computed once and added to each; holding the tensors keeps ``is`` exact (no reused memory can match).
        products: list[tuple[Tensor, tuple[Tensor, int]]] = []

        def record(name: str, args: tuple) -> None:
            x, accumulator = args[0], accumulators[name]
            product = next((p for seen, p in products if seen is x and p[0].device == accumulator.sum.device), None)
            if product is None:
                product = HessianAccumulator.product(x, accumulator.sum.device)
                products.append((x, product))
            accumulator.add_product(*product)
            pending.discard(name)
            if not pending:
                raise _StopForward

        handles = [
            lin.register_forward_hook(lambda mod, args, out, name=name: record(name, args))
            for name, lin in linears.items()
        ]
        try:
            for hidden, args, kwargs in inputs:
                stop_if_interrupted()
                pending.update(linears)
                products.clear()
                try:
                    block(hidden, *args, **kwargs)
                except _StopForward:
                    pass
            products.clear()
        finally:
            for handle in handles:
                handle.remove()
        return {name: acc.hessian() for name, acc in accumulators.items()}

    @torch.no_grad()
    def quantize_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> None:
        self._quantize_blocks(model, linears, calibration, record=False)

    @torch.no_grad()
    def encode_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """The codes / scale / zero (on the CPU) of the pass :meth:`quantize_model` makes; the model is left unchanged."""
        with weights_restored(linears):
            return self._quantize_blocks(model, linears, calibration, record=True)

    def _quantize_blocks(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None,
        record: bool,
    ) -> dict[str, dict[str, Tensor]]:
        """The block-by-block pass: writes the quantized weights in place (later blocks and stages are
        calibrated on them) and, if ``record``, returns each linear's fields."""
        if calibration is None or calibration.numel() == 0:
            raise ValueError("GPTQ needs calibration token windows (a LongTensor [n_windows, seq_len])")
        if calibration.dim() == 1:
            calibration = calibration[None]
        _, blocks = decoder_blocks(model)
        per_block: dict[int, dict[str, nn.Linear]] = {}
        for name, linear in linears.items():
            per_block.setdefault(block_index(name), {})[name] = linear
        fields: dict[str, dict[str, Tensor]] = {}
        if not per_block:
            return fields
        last = max(per_block)

        was_training = model.training
        model.eval()
        try:
            with no_tf32():
                inputs = capture_block_inputs(model, blocks[0], calibration, self.batch_size)
                for b in tqdm(range(last + 1), desc=f"{self.name} blocks", leave=False):
                    block, block_linears = blocks[b], per_block.get(b, {})
                    stages = sequential_stages(list(block_linears)) if self.true_sequential else [list(block_linears)]
                    stages = [stage for stage in stages if stage]
                    for stage in stages:
                        # Each stage's Hessians see the outputs of the already-quantized earlier stages.
                        hessians = self._hessians(block, inputs, {n: block_linears[n] for n in stage})
                        for name in stage:
                            stop_if_interrupted()
                            weight = block_linears[name].weight
                            keep = None if self.kept is None else self.kept.get(name)
                            encoded = self.matrix_fields(weight.float(), hessians.pop(name), keep, name=name)
                            decoded = self.decode_weight(encoded).to(device=weight.device, dtype=weight.dtype)
                            if keep is not None:  # later stages and blocks calibrate on the dense + sparse weights
                                decoded = torch.where(keep.to(weight.device), weight, decoded)
                            weight.copy_(decoded)
                            if record:
                                fields[name] = {field: t.cpu() for field, t in encoded.items()}
                    if b < last:  # the next block's inputs come from this (quantized) block
                        outputs = run_block(block, inputs)
                        inputs = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, inputs)]
        finally:
            model.train(was_training)
        return fields
