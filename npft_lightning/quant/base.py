"""The one interface every quantizer implements, and the fake-quantization context around it (exact restore)."""

from __future__ import annotations

from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Mapping

import torch
from torch import Tensor, nn

from npft_lightning.core.errors import UserError
from npft_lightning.core.interrupt import check as stop_if_interrupted
from npft_lightning.core.restore import weights_restored


def is_int(value: object) -> bool:
    """An integer setting (``True`` is no count): what a quantizer's constructor accepts for bits, sizes, counts."""
    return isinstance(value, int) and not isinstance(value, bool)


class WeightQuantizer:
    """A weight-only fake quantizer.

    Weight-local quantizers (RTN, NF4, cube-root, k-means) implement :meth:`encode_weight` (the
    integer codes and their scales / lookup tables, what a real export stores) and
    :meth:`decode_weight`; :meth:`quantize_weight` is their composition, so fake quantization and
    export cannot diverge. A quantizer may instead override :meth:`quantize_weight` alone (it is
    then usable for fake quantization, not for export). Quantizers that need activations (GPTQ)
    override :meth:`quantize_model` and :meth:`encode_model`, which by default handle each linear on
    its own. ``name`` is the key used in logs (``val/ppl_<name>``).
    """

    name: str = "quantizer"
    needs_calibration: bool = False

    def encode_weight(self, weight: Tensor, *, name: str | None = None) -> dict[str, Tensor]:
        """The stored form of one weight matrix [out_features, in_features]: field name -> tensor.

        Integer codes are ``uint8`` tensors with values below ``2**bits`` (the export bit-packs them);
        scales, zero points and lookup tables are float32, so that decoding is exact.
        """
        raise NotImplementedError(f"{type(self).__name__} has no stored (encoded) form; it only fake-quantizes")

    def decode_weight(self, payload: Mapping[str, Tensor]) -> Tensor:
        """Float32 weight matrix from the fields returned by :meth:`encode_weight`."""
        raise NotImplementedError(f"{type(self).__name__} has no stored (encoded) form; it only fake-quantizes")

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        """Fake-quantized copy of one weight matrix [out_features, in_features] (same dtype)."""
        return self.decode_weight(self.encode_weight(weight, name=name)).to(weight.dtype)

    @torch.no_grad()
    def quantize_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> None:
        """Replace, in place, the weights of ``linears`` (canonical name -> Linear) by their fake-quantized values."""
        for name, linear in linears.items():
            stop_if_interrupted()  # a layer of k-means takes seconds on a large model
            linear.weight.copy_(self.quantize_weight(linear.weight.float(), name=name).to(linear.weight.dtype))

    @torch.no_grad()
    def encode_model(
        self,
        model: nn.Module,
        linears: Mapping[str, nn.Linear],
        calibration: Tensor | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """Canonical name -> :meth:`encode_weight` fields (on the CPU) of each of ``linears``.

        The model is left unchanged; decoding the fields and casting to the weight dtype gives
        exactly the weights :meth:`quantize_model` writes.
        """
        fields = {}
        for name, linear in linears.items():
            stop_if_interrupted()
            fields[name] = {field: t.cpu() for field, t in self.encode_weight(linear.weight.float(), name=name).items()}
        return fields

    @property
    def stores_weights(self) -> bool:
        """Whether :meth:`encode_model` gives a stored form (what the export writes and effective bits count)."""
        cls = type(self)
        return cls.encode_weight is not WeightQuantizer.encode_weight or cls.encode_model is not WeightQuantizer.encode_model

    def activation_hooks(self, linears: Mapping[str, nn.Linear]) -> AbstractContextManager:
        """What the quantized model needs at run time while it is evaluated: a context that installs it
        on ``linears`` and removes it on exit. Nothing for weight-only quantizers; activation
        quantizers (:mod:`~npft_lightning.quant.activation`) quantize each linear's input there."""
        return nullcontext()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"




@torch.no_grad()
def quantize_encoded(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer,
    calibration: Tensor | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Write the decoded :meth:`~WeightQuantizer.encode_model` fields into ``linears`` and return the fields.

    The weights are the ones :meth:`~WeightQuantizer.quantize_model` writes (the export's guarantee); this
    way the stored form is at hand too, without quantizing twice.
    """
    fields = quantizer.encode_model(model, linears, calibration)
    for name, linear in linears.items():
        weight = quantizer.decode_weight(fields[name])
        linear.weight.copy_(weight.to(device=linear.weight.device, dtype=linear.weight.dtype))
    return fields


@contextmanager
def fake_quantized(
    model: nn.Module,
    linears: Mapping[str, nn.Linear],
    quantizer: WeightQuantizer,
    deltas: Mapping[str, Tensor] | None = None,
    calibration: Tensor | None = None,
    sizes: dict | None = None,
) -> Iterator[None]:
    """Within the block, ``linears`` hold ``Q(W + delta)``; on exit the exact original ``W``.

    ``sizes``: a dict to fill with the stored size and effective bits per weight of the quantized
    linears (:func:`~npft_lightning.quant.packing.encoding_size`), and for a ggml quantizer their size in
    the GGUF file (:func:`~npft_lightning.quant.packing.gguf_linear_size`); left empty for quantizers
    without a stored form (activation quantization).

    ``deltas`` are the merged adapter updates (LoRA ``B @ A * scaling``), so the quantizer sees
    the weights a user would export; the caller disables the adapters meanwhile. The quantizer's
    run-time hooks (activation quantization) are installed after the weights are quantized (GPTQ
    calibrates on unquantized inputs) and removed before the weights are restored.
    """
    with weights_restored(linears):
        with torch.no_grad():
            for name, delta in (deltas or {}).items():
                linears[name].weight.add_(delta.to(linears[name].weight.dtype))
        _check_finite(linears, quantizer, before=True)
        if sizes is not None and quantizer.stores_weights:
            from npft_lightning.quant.packing import (
                code_bits,
                encoding_size,
                gguf_linear_size,
            )

            fields = quantize_encoded(model, linears, quantizer, calibration)
            n_weights = sum(linear.weight.numel() for linear in linears.values())
            sizes.update(encoding_size(fields, lambda name: code_bits(quantizer, name), n_weights))
            sizes.update(gguf_linear_size(fields, {n: tuple(l.weight.shape) for n, l in linears.items()}, quantizer) or {})
            del fields
        else:
            quantizer.quantize_model(model, linears, calibration)
        _check_finite(linears, quantizer, before=False)
        with quantizer.activation_hooks(linears):
            yield


class NonFiniteQuantization(UserError):
    """NaN or inf in a weight matrix around quantization (degenerate scales, a bad table, a diverged adapter)."""


def _check_finite(linears: Mapping[str, nn.Linear], quantizer: WeightQuantizer, before: bool) -> None:
    """Raise :class:`NonFiniteQuantization` naming the first of ``linears`` whose weight is not all finite."""
    for name, linear in linears.items():
        finite = torch.isfinite(linear.weight)
        if bool(finite.all()):
            continue
        bad = int(finite.numel() - finite.sum())
        if before:
            raise NonFiniteQuantization(
                f"{name} holds {bad} non-finite weights (NaN/inf) before quantizer {quantizer.name} runs; "
                f"the model or its merged adapter diverged: resume from an earlier checkpoint or lower optimizer.lr"
            )
        raise NonFiniteQuantization(
            f"quantizer {quantizer.name} produced {bad} non-finite weights (NaN/inf) of {finite.numel()} in {name}; "
            f"its settings are degenerate for this layer: try another group_size or quantizer"
        )
