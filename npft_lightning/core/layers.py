"""Find the weight matrices that NPFT and the quantizers act on.

Every ``nn.Linear`` inside the decoder blocks, nothing else: embeddings, ``lm_head`` and norms
stay untouched (the GPTQ protocol). Names are canonical: the PEFT wrapper prefixes
(``base_model.model.``) and the LoRA ``.base_layer`` suffix are stripped, so a mask computed on
the plain model applies to the wrapped one and the other way round.
"""

from __future__ import annotations

from torch import nn

_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """``base_model.model.model.layers.0.mlp.up_proj.base_layer`` -> ``model.layers.0.mlp.up_proj``."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer", "")


def decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList holding the transformer blocks (``model.layers``, ``model.decoder.layers``, ``transformer.h``)."""
    best: tuple[str, nn.ModuleList] | None = None
    best_params = -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not (name.endswith("layers") or name.endswith(".h") or name == "h"):
            continue
        n_params = sum(p.numel() for p in module.parameters())
        if n_params > best_params:
            best, best_params = (name, module), n_params
    if best is None:
        raise ValueError(
            f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList named '*layers' or 'h'"
        )
    return best


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Canonical name -> the (base) ``nn.Linear`` of every linear layer inside the decoder blocks.

    LoRA's own ``lora_A``/``lora_B`` linears are skipped; for a LoRA-wrapped layer the frozen
    ``base_layer`` is returned, which is where the pretrained weight lives.
    """
    prefix, _ = decoder_blocks(model)
    found: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if not name.startswith(prefix + ".") or not isinstance(module, nn.Linear):
            continue
        if ".lora_" in name:
            continue
        found[canonical_name(name)] = module
    return found


def block_index(name: str) -> int:
    """Decoder block number of a canonical linear name (``model.layers.12.mlp.up_proj`` -> 12)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"no block index in layer name {name!r}")
