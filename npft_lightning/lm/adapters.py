"""PEFT adapter folders given to ``eval.py`` and ``analyze.py`` (``adapter=``, ``adapters=``).

Checked twice, each time with one line naming the folder and what is wrong: before the model loads,
that the folder is a complete, readable adapter (:func:`check_adapter_folder`: config and weight
shapes, read from the file headers); once the model has loaded, that the adapter fits it: the model
class it was trained on, the modules it adapts and their shapes (:func:`check_adapter_fits`). PEFT
itself answers a mismatch with a traceback, or, for modules the model lacks, not at all.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from torch import nn

from npft_lightning.core.errors import UserError

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
FIX = "give the adapter/ folder a training run wrote (logs/npft_smollm2/runs/<run>/adapter)"
# PEFT's saved names: base_model.model.<module path in the HF model>.lora_A.weight (lora_B: the output side).
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def adapter_config(key: str, value: Any) -> dict[str, Any]:
    """The folder's ``adapter_config.json``; one line naming ``key`` when the folder is not an adapter folder."""
    path = Path(str(value)).expanduser()
    if path.is_file():
        hint = f"export it first: python -m npft_lightning export {value}" if path.suffix == ".ckpt" else FIX
        raise UserError(f"{key}={value} is a file, not an adapter folder; {hint}")
    if not path.is_dir():
        raise UserError(f"{key}={value} does not exist; {FIX}")
    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{key}={value} has no {CONFIG_FILE}; {FIX}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{key}={value}: {CONFIG_FILE} cannot be read ({err.__class__.__name__}); {FIX}") from err
    if not isinstance(config, dict) or "peft_type" not in config:
        raise UserError(f"{key}={value}: {CONFIG_FILE} is not a PEFT adapter config (no peft_type); {FIX}")
    return config


def adapter_shapes(key: str, value: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """Adapted module path -> shapes of its ``lora_A`` / ``lora_B``, read from the weight file's header (no tensors loaded)."""
    path = Path(str(value)).expanduser()
    weights = next((path / name for name in WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise UserError(f"{key}={value} has no adapter weights ({' or '.join(WEIGHT_FILES)}), so the folder is incomplete; {FIX}")
    try:
        if weights.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        else:
            import torch

            state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
            shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
    except Exception as err:  # noqa: BLE001 - any failure to read it means the same to the user
        raise UserError(f"{key}={value}: {weights.name} cannot be read ({err.__class__.__name__}); it is truncated "
                        f"or not a file PEFT wrote; {FIX}") from err
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, shape in shapes.items():
        match = _LORA_KEY.match(name)
        if match:
            modules.setdefault(match["module"], {})[match["part"]] = shape
    if not modules:
        raise UserError(f"{key}={value}: {weights.name} holds no LoRA weights (lora_A / lora_B); {FIX}")
    return modules


def check_adapter_folder(key: str, value: Any) -> None:
    """Before the model loads: ``value`` is a complete adapter folder whose files can be read."""
    adapter_config(key, value)
    adapter_shapes(key, value)


def check_adapter_fits(key: str, value: Any, model: nn.Module, model_name: str) -> None:
    """After the model loads: the adapter was trained on this kind of model, and every module it adapts exists with its shapes."""
    config = adapter_config(key, value)
    base = config.get("base_model_name_or_path")
    fix = f"apply it to the model it was trained on{f' ({base})' if base else ''}, or train an adapter for model={model_name}"
    trained_on = (config.get("auto_mapping") or {}).get("base_model_class")
    if trained_on and trained_on != type(model).__name__:
        raise UserError(f"{key}={value} was trained for {trained_on}, but model={model_name} loads {type(model).__name__}; {fix}")
    for module, parts in sorted(adapter_shapes(key, value).items()):
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            raise UserError(f"{key}={value} adapts {module}, which model={model_name} does not have; {fix}") from None
        if not isinstance(layer, nn.Linear):
            continue
        features_in = parts["lora_A"][-1] if "lora_A" in parts else layer.in_features
        features_out = parts["lora_B"][0] if "lora_B" in parts else layer.out_features
        if (features_in, features_out) != (layer.in_features, layer.out_features):
            raise UserError(f"{key}={value} does not fit model={model_name}: its LoRA weights for {module} map {features_in} -> "
                            f"{features_out} features, the model's layer {layer.in_features} -> {layer.out_features}; {fix}")


def merge_adapter(model: nn.Module, key: str, value: Any, model_name: str) -> nn.Module:
    """``model`` with the adapter folder ``value`` merged in, after checking that it fits."""
    from peft import PeftModel

    check_adapter_fits(key, value, model, model_name)
    return PeftModel.from_pretrained(model, str(Path(str(value)).expanduser())).merge_and_unload()
