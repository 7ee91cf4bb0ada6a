"""Activation fake quantization: the inputs of the decoder linears, per token, at run time.

* per-token symmetric RTN: each token's feature vector ``x`` gets its own step
  ``s = clip · max|x| / (2^(b-1) - 1)``, ``x̂ = s · clamp(round(x / s), -(2^(b-1)-1), 2^(b-1)-1)``
  (the dynamic per-token scheme of LLM.int8() / SmoothQuant / ZeroQuant). ``clip < 1`` clips the
  largest values of each token to gain resolution for the rest.
* cube-root ("lens of perturbation", Gong et al. 2024): the same per-token RTN on
  ``f(x) = sign(x)|x|^(1/3)``, cubed back, so small activations get a fine grid and large ones a
  coarse one.

:class:`WeightActivationQuantizer` pairs an optional weight quantizer with an activation
quantizer (W8A8, W4A8, ...) behind the :class:`~npft_lightning.quant.base.WeightQuantizer`
interface: it quantizes the weights as its weight part does and, through
:meth:`WeightActivationQuantizer.activation_hooks`, installs forward pre-hooks that quantize each
linear's input. :func:`~npft_lightning.quant.base.fake_quantized` opens those hooks after the
weights are quantized and removes them when it restores the weights, so every caller of
``fake_quantized`` (the fake-quant validation callback, ``eval.py``, ``analyze.py``) gets activation
quantization with no change. Math in float32; the result has the input's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

from npft_lightning.quant.base import WeightQuantizer

METHODS = ("rtn", "cuberoot")


def _check(bits: int, clip_ratio: float) -> None:
    if not 2 <= int(bits) <= 8:
        raise ValueError(f"activation bits={bits} is outside 2..8; use a value from 2 to 8")
    if not 0 < float(clip_ratio) <= 1:
        raise ValueError(f"activation clip_ratio={clip_ratio} must be in (0, 1]; 1 = no clipping")


def per_token_rtn(x: Tensor, bits: int, clip_ratio: float = 1.0) -> Tensor:
    """Symmetric RTN with one step per token (the last dimension is the feature dimension).

    Levels ``-(2^(b-1)-1) .. 2^(b-1)-1`` (the grid is symmetric, 0 exact); ``s = clip·max|x|/qmax``.
    An all-zero token stays zero. Same dtype and shape as ``x``.
    """
    _check(bits, clip_ratio)
    qmax = 2 ** (int(bits) - 1) - 1
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True) * float(clip_ratio)
    scale = torch.where(absmax > 0, absmax / qmax, torch.ones_like(absmax))
    return (torch.clamp(torch.round(xf / scale), -qmax, qmax) * scale).to(x.dtype)


def per_token_cuberoot(x: Tensor, bits: int, clip_ratio: float = 1.0) -> Tensor:
    """Per-token symmetric RTN of ``sign(x)|x|^(1/3)``, cubed back (companding). Same dtype as ``x``."""
    xf = x.float()
    f = torch.sign(xf) * xf.abs().pow(1.0 / 3.0)
    fq = per_token_rtn(f, bits, clip_ratio)
    return (fq * fq * fq).to(x.dtype)


class ActivationQuantizer:
    """Per-token symmetric fake quantizer of activations: ``method`` = ``rtn`` or ``cuberoot``."""

    def __init__(self, bits: int = 8, method: str = "rtn", clip_ratio: float = 1.0, name: str | None = None):
        if method not in METHODS:
            raise ValueError(f"activation method={method!r} is not one of {', '.join(METHODS)}")
        _check(bits, clip_ratio)
        self.bits = int(bits)
        self.method = method
        self.clip_ratio = float(clip_ratio)
        clip = "" if self.clip_ratio == 1.0 else f"_c{self.clip_ratio:g}"
        self.name = name or f"a{self.bits}{'' if method == 'rtn' else '_' + method}{clip}"

    def __call__(self, x: Tensor) -> Tensor:
        fn = per_token_rtn if self.method == "rtn" else per_token_cuberoot
        return fn(x, self.bits, self.clip_ratio)

    @contextmanager
    def hooks(self, linears: Mapping[str, nn.Linear]) -> Iterator[None]:
        """Within the block, every linear of ``linears`` sees its input quantized; the hooks are removed on exit."""

        def quantize_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
            return (self(args[0]), *args[1:])

        handles = [linear.register_forward_pre_hook(quantize_input) for linear in linears.values()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def __repr__(self) -> str:
        return f"ActivationQuantizer(bits={self.bits}, method={self.method!r}, clip_ratio={self.clip_ratio}, name={self.name!r})"


class WeightActivationQuantizer(WeightQuantizer):
    """Weights by ``weight`` (None = full precision, e.g. W16A8), inputs of the same linears by ``activation``.

    ``conf/quant/w8a8.yaml``, ``w4a8.yaml``, ``w4a8_cuberoot.yaml`` ... The weight part may be any
    quantizer (GPTQ calibrates on unquantized activations); a Fisher-weighted one (k-means) gets its
    ``sensitivity`` through this object. Activation quantization happens at run time, so there is
    no stored artefact of it: the export refuses it.
    """

    def __init__(self, activation: ActivationQuantizer, weight: WeightQuantizer | None = None, name: str | None = None):
        if not isinstance(activation, ActivationQuantizer):
            raise ValueError(f"activation={activation!r} must be an ActivationQuantizer (conf/quant/w*a*.yaml)")
        self.weight = weight
        self.activation = activation
        wbits = "16" if weight is None else str(getattr(weight, "bits", weight.name))
        self.name = name or f"w{wbits}{activation.name}"
        self.needs_calibration = bool(weight is not None and weight.needs_calibration)

    # The fake-quant callback and eval.py look for ``sensitivity`` to hand Fisher scores to
    # sensitivity-weighted quantizers: forward it to the weight part, and only if it has one.
    def __getattr__(self, key: str) -> Any:
        if key == "sensitivity" and hasattr(self.__dict__.get("weight"), "sensitivity"):
            return self.__dict__["weight"].sensitivity
        raise AttributeError(f"{type(self).__name__} has no attribute {key!r}")

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "sensitivity" and hasattr(self.__dict__.get("weight"), "sensitivity"):
            self.__dict__["weight"].sensitivity = value
        else:
            super().__setattr__(key, value)

    def quantize_weight(self, weight: Tensor, *, name: str | None = None) -> Tensor:
        return weight.clone() if self.weight is None else self.weight.quantize_weight(weight, name=name)

    @torch.no_grad()
    def quantize_model(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None = None) -> None:
        if self.weight is not None:
            self.weight.quantize_model(model, linears, calibration)

    def activation_hooks(self, linears: Mapping[str, nn.Linear]):
        return self.activation.hooks(linears)

    stores_weights = False  # the run-time activation part has no stored form

    def encode_model(self, model: nn.Module, linears: Mapping[str, nn.Linear], calibration: Tensor | None = None):
        raise ValueError(
            f"quantizer {self.name} quantizes activations at run time, which a weight artefact cannot hold; "
            f"export its weight quantizer instead (e.g. quant=rtn4)"
        )

    def __repr__(self) -> str:
        return f"WeightActivationQuantizer(weight={self.weight!r}, activation={self.activation!r}, name={self.name!r})"
