"""What eval.py's ``gguf_out`` will write, checked against the config before the model loads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml import FORMATS, GGMLQuantizer
from npft_lightning.quant.gguf_export import (
    BYTES,
    SUPPORTED_ARCHS,
    GGUFPlan,
    check_gguf_output,
    gguf_architecture,
    gguf_paths,
)


def plan_gguf_export(cfg, quantizers: Mapping[str, Any]) -> GGUFPlan | None:
    """Check ``gguf_out`` against the config before the model loads; None when no GGUF is asked for.

    Each problem is one :class:`UserError` line: a quantizer with no ggml type, a model whose
    architecture or tokenizer cannot be written, an output path that cannot be written.
    """
    out = cfg.get("gguf_out")
    if not out:
        if cfg.get("llamacpp_ppl"):
            raise UserError("llamacpp_ppl=true scores the GGUF file eval.py writes: set gguf_out=<file>.gguf too")
        return None
    names = list(quantizers)
    if not names:
        raise UserError(f"gguf_out={out} needs a ggml quantizer: add quant=q4_0 (or q4_1, q5_0, q5_1, q8_0)")
    for name, q in quantizers.items():
        if not isinstance(q, GGMLQuantizer):
            raise UserError(f"gguf_out={out}: quant.{name} ({type(q).__name__}) has no ggml type; GGUF files hold "
                            f"the ggml block types: use quant={'|'.join(FORMATS)} (or a list of them)")
    arch = _config_architecture(cfg.model)
    if arch is not None and arch not in SUPPORTED_ARCHS:
        raise UserError(f"gguf_out={out}: model {cfg.model.get('name')} has architecture {arch!r}; "
                        f"the GGUF export supports {', '.join(SUPPORTED_ARCHS)} (e.g. model=smollm2-135m or model=tiny-llama)")
    vocab = _vocab_source(cfg)
    paths = gguf_paths(out, names)
    for path in paths.values():
        check_gguf_output(path)
    if cfg.get("llamacpp_ppl"):
        from npft_lightning.quant.llamacpp import require_llama_cpp

        require_llama_cpp()
    return GGUFPlan(paths, vocab)


def _config_architecture(model_cfg) -> str | None:
    """The model_type the config will load, where it can be known without loading (None: check after loading)."""
    tiny = model_cfg.get("tiny")
    if model_cfg.get("path"):
        config = Path(str(model_cfg.path)).expanduser() / "config.json"
        try:
            return json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None  # the model config check reports a missing folder
    if tiny is not None:
        return str(tiny.get("arch", "llama"))
    if model_cfg.get("gguf_package") and model_cfg.get("gguf_file"):
        return gguf_architecture(str(_source_gguf(model_cfg)))
    return None


def _source_gguf(model_cfg) -> Path:
    from npft_lightning.core.env import package_dir

    path = package_dir(str(model_cfg.gguf_package), f"model {model_cfg.get('name')!r}") / str(model_cfg.gguf_file)
    if not path.is_file():
        raise UserError(f"model {model_cfg.get('name')!r}: {path} does not exist; check model.gguf_file")
    return path


def _vocab_source(cfg) -> str:
    """The GGUF whose tokenizer metadata is copied, or BYTES for the byte-tokenizer models."""
    if cfg.get("gguf_vocab"):
        path = Path(str(cfg.gguf_vocab)).expanduser()
        if not path.is_file():
            raise UserError(f"gguf_vocab={cfg.gguf_vocab} does not exist; give a .gguf file with this model's tokenizer")
        return str(path)
    model_cfg = cfg.model
    if model_cfg.get("path"):
        if (Path(str(model_cfg.path)).expanduser() / "byte_tokenizer.json").is_file():
            return BYTES
    elif model_cfg.get("tiny") is not None:
        return BYTES
    elif model_cfg.get("gguf_package") and model_cfg.get("gguf_file"):
        return str(_source_gguf(model_cfg))
    raise UserError(f"gguf_out: llama.cpp needs the tokenizer in the file, and model {model_cfg.get('name')!r} "
                    f"has no GGUF to copy it from; set gguf_vocab=<a .gguf with the same tokenizer> "
                    f"(for SmolLM2: the bundled SmolLM2-135M-Instruct.Q4_1.gguf)")
