"""What eval.py's ``gguf_out`` will write, checked against the config before the model loads: our own
ggml exports (``quant=q4_0``, ``quant=q4_k``, ``quant=llamacpp_q4_k_m`` ...), or llama.cpp's quantizations of
the model (``llamacpp_types``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from npft_lightning.core.errors import UserError
from npft_lightning.quant.ggml_base import GGMLTypeQuantizer
from npft_lightning.quant.gguf_export import (
    BYTES,
    FLOAT_TYPES,
    GGUF_ARCHS,
    SUPPORTED_ARCHS,
    GGUFPlan,
    check_gguf_output,
    check_gguf_vocab,
    gguf_architecture,
    gguf_paths,
    gguf_widths,
    writes_gguf,
)
from npft_lightning.quant.llamacpp_filetype import TWINS
from npft_lightning.quant.llamacpp_rules import MOSTLY, block_size


def plan_gguf_export(cfg, quantizers: Mapping[str, Any]) -> GGUFPlan | None:
    """Check ``gguf_out`` against the config before the model loads; None when no GGUF is asked for.

    Each problem is one :class:`UserError` line: a quantizer with no ggml type, a single type whose blocks
    do not divide the model's rows (where the config tells its widths), a model whose architecture or
    tokenizer cannot be written, an output path that cannot be written.
    """
    out = cfg.get("gguf_out")
    if llamacpp_types(cfg):
        return None  # gguf_out names llama.cpp's files instead (plan_llamacpp_files)
    if not out:
        if cfg.get("llamacpp_ppl"):
            raise UserError("llamacpp_ppl=true scores the GGUF file eval.py writes: set gguf_out=<file>.gguf too")
        return None
    names = list(quantizers)
    if not names:
        raise UserError(f"gguf_out={out} needs a ggml quantizer: add quant=q4_0 (or another ggml type, e.g. q4_k, "
                        f"iq4_xs, or a llama.cpp file type, e.g. llamacpp_q4_k_m)")
    for name, q in quantizers.items():
        if not writes_gguf(q):
            raise UserError(f"gguf_out={out}: quant.{name} ({type(q).__name__}) has no ggml type; GGUF files hold "
                            f"ggml types: use quant={'|'.join(TWINS)} or a llama.cpp file type (e.g. "
                            f"llamacpp_q4_k_m), or a list of them")
    _check_architecture(cfg.model, f"gguf_out={out}")
    _check_blocks(quantizers, _config_columns(cfg.model) or (), f"gguf_out={out}")
    vocab = _vocab_source(cfg)
    paths = gguf_paths(out, names)
    for path in paths.values():
        check_gguf_output(path)
    if cfg.get("llamacpp_ppl"):
        from npft_lightning.quant.llamacpp import require_llama_cpp

        require_llama_cpp()
    return GGUFPlan(paths, vocab)


def _check_blocks(quantizers: Mapping[str, Any], columns, key: str) -> None:
    """A single ggml type whose blocks do not divide a decoder linear's rows (``columns``: their input widths) cannot
    be written; llama.cpp gives such tensors another type, and so does the file type named in the line."""
    for name, q in quantizers.items():
        if not isinstance(q, GGMLTypeQuantizer):
            continue  # a file type falls back by itself
        size = block_size(q.qtype)
        for n in sorted(columns):
            if n % size:
                raise UserError(f"{key}: quant.{name} ({q.qtype}) stores blocks of {size} weights of a row, which do not "
                                f"divide the {n} input features of this model's decoder linears; llama.cpp writes such "
                                f"tensors in a fallback type: use quant=llamacpp_{MOSTLY[q.qtype].lower()} (its file type, "
                                f"with llama.cpp's fallbacks)")


def _check_architecture(model_cfg, key: str) -> None:
    arch = _config_architecture(model_cfg)
    if arch is not None and arch not in SUPPORTED_ARCHS:
        raise UserError(f"{key}: model {model_cfg.get('name')} has architecture {arch!r}; "
                        f"the GGUF export supports {', '.join(SUPPORTED_ARCHS)} (e.g. model=smollm2-135m, model=tiny-llama "
                        f"or model=tiny-gemma3)")


def _config_architecture(model_cfg) -> str | None:
    """The llama.cpp architecture the config will load (a model_type the export does not know: that model_type),
    where it can be known without loading (None: check after loading)."""
    tiny = model_cfg.get("tiny")
    if model_cfg.get("path"):
        config = Path(str(model_cfg.path)).expanduser() / "config.json"
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError):
            return None  # the model config check reports a missing folder
        return GGUF_ARCHS.get(model_type, model_type)
    if tiny is not None:
        return str(tiny.get("arch", "llama"))  # the tiny architectures are named as llama.cpp's
    if model_cfg.get("gguf_package") and model_cfg.get("gguf_file"):
        return gguf_architecture(str(_source_gguf(model_cfg)))
    return None


def _source_gguf(model_cfg) -> Path:
    from npft_lightning.lm.models import gguf_source

    return gguf_source(str(model_cfg.gguf_package), str(model_cfg.gguf_file), str(model_cfg.get("name")))


def _vocab_source(cfg) -> str:
    """The GGUF whose tokenizer metadata is copied, or BYTES for the byte-tokenizer models."""
    if cfg.get("gguf_vocab"):
        check_gguf_vocab("gguf_vocab", str(cfg.gguf_vocab))
        return str(Path(str(cfg.gguf_vocab)).expanduser())
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
                    f"(for SmolLM2: the bundled SmolLM2-135M-Instruct.Q4_1.gguf; for Gemma 3 270M: gemma-3-270m-q4_k_m.gguf)")


# ---------------------------------------------------------------------------------------------
# llama.cpp's own quantizer: llamacpp_types, imatrix
# ---------------------------------------------------------------------------------------------

IMATRIX_CHOICES = (False, True, "both")


@dataclass
class LlamaCppPlan:
    """What ``llamacpp_types`` will write: the float GGUF llama.cpp quantizes, one file per (type, imatrix or not)."""

    types: list[str]  # file types, upper case
    float_type: str  # f32 or f16
    float_path: Path
    files: list[tuple[str, bool, Path]]  # (file type, with the imatrix, path)
    imatrix_path: Path | None  # where the importance matrix is written, or read from (None: no imatrix)
    vocab: str  # a .gguf path, or BYTES
    imatrix_given: bool = False  # imatrix=<file>: read (a training run's <run>/imatrix.gguf, llama-imatrix's), not computed


def llamacpp_types(cfg) -> list[str]:
    """``llamacpp_types`` as a list of upper-case names, in order, each once (``llamacpp_types=Q4_0`` is ``[Q4_0]``)."""
    types = cfg.get("llamacpp_types") or []
    types = [types] if isinstance(types, str) else list(types)
    return list(dict.fromkeys(str(t).upper() for t in types))


def plan_llamacpp_files(cfg) -> LlamaCppPlan | None:
    """Check ``llamacpp_types`` / ``imatrix`` / ``llamacpp_float`` before the model loads; None when not asked for.

    Each problem is one :class:`UserError` line: an unknown file type, an imatrix with nothing to weight or no
    calibration windows, a model that is not a llama model or whose widths llama.cpp would leave unquantized,
    an output that cannot be written, llama.cpp missing.
    """
    from npft_lightning.quant.llamacpp_quantize import check_columns, file_type

    types = llamacpp_types(cfg)
    imatrix = cfg.get("imatrix", False)
    shown = str(imatrix).lower()  # as typed: true, not Python's True
    given = _imatrix_file(imatrix)
    if given is not None:
        imatrix = True
    if not types:
        if imatrix:
            raise UserError(f"imatrix={shown} weights llama.cpp's quantizer, but llamacpp_types is empty; "
                            f"add llamacpp_types=[Q4_K_M] (or drop imatrix)")
        return None
    key = "llamacpp_types"
    for name in types:
        file_type(name, key)
    float_type = str(cfg.get("llamacpp_float") or "f32").lower()
    if float_type not in FLOAT_TYPES:
        raise UserError(f"llamacpp_float={cfg.get('llamacpp_float')} is not one of {', '.join(FLOAT_TYPES)}")
    out = cfg.get("gguf_out")
    if not out:
        raise UserError(f"{key}={types} writes GGUF files: set gguf_out=<file>.gguf (their names derive from it: "
                        f"<stem>-{types[0]}.gguf)")
    if imatrix and given is None and not _has_calibration(cfg.get("calibration")):
        raise UserError(f"imatrix={shown} is computed on calibration windows of the train split, but calibration.windows "
                        f"/ calibration.length are not set; set them (e.g. calibration.windows=128 calibration.length=512)")
    _check_architecture(cfg.model, key)
    # Where the config tells the widths, a layer llama.cpp would leave unquantized stops here (else once the model loads).
    columns = _config_columns(cfg.model) or ()
    for name in types:
        check_columns(name, columns, key)
    vocab = _vocab_source(cfg)
    out = Path(str(out)).expanduser()
    suffix = out.suffix or ".gguf"
    variants = {"both": (False, True), True: (True,), False: (False,)}[imatrix]
    files = [(name, with_imatrix, out.with_name(f"{out.stem}-{name}{'-imatrix' if with_imatrix else ''}{suffix}"))
             for name in types for with_imatrix in variants]
    imatrix_path = given if given is not None else out.with_name(f"{out.stem}.imatrix.gguf") if imatrix else None
    plan = LlamaCppPlan(types, float_type, out.with_name(f"{out.stem}-{float_type.upper()}{suffix}"), files,
                        imatrix_path, vocab, imatrix_given=given is not None)
    for path in [plan.float_path, *(path for *_, path in files), *([imatrix_path] if imatrix and given is None else [])]:
        check_gguf_output(path)
    from npft_lightning.quant.llamacpp import require_llama_cpp

    require_llama_cpp(key)
    return plan


def _imatrix_file(imatrix) -> Path | None:
    """eval.py's ``imatrix`` as a file to read (None: true / false / both); one line for anything else, or a file
    that is no imatrix."""
    if imatrix in IMATRIX_CHOICES:
        return None
    path = Path(str(imatrix)).expanduser()
    if not isinstance(imatrix, str) or not path.is_file():
        raise UserError(f"imatrix={str(imatrix).lower()} is not one of true, false, both (each llamacpp_types file with and "
                        f"without it), nor an imatrix file that exists (e.g. a training run's <run>/imatrix.gguf)")
    from npft_lightning.quant.imatrix import read_imatrix

    read_imatrix(path)  # another format: one line now
    return path


def _has_calibration(calibration) -> bool:
    return calibration is not None and bool(calibration.get("windows")) and bool(calibration.get("length"))


def _config_columns(model_cfg) -> set[int] | None:
    """The decoder linears' input widths (hidden and intermediate size) where the config tells without loading."""
    tiny = model_cfg.get("tiny")
    if model_cfg.get("path"):
        try:
            config = json.loads((Path(str(model_cfg.path)).expanduser() / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        widths = {config.get("hidden_size"), config.get("intermediate_size")}
        if config.get("head_dim") and config.get("num_attention_heads"):  # the attention output's input (Gemma: not hidden)
            widths.add(config["head_dim"] * config["num_attention_heads"])
    elif tiny is not None:
        from npft_lightning.lm.models import TINY_DEFAULTS

        widths = {tiny.get("hidden_size", TINY_DEFAULTS["hidden_size"]), tiny.get("intermediate_size", TINY_DEFAULTS["intermediate_size"])}
    elif model_cfg.get("gguf_package") and model_cfg.get("gguf_file"):
        widths = set(gguf_widths(str(_source_gguf(model_cfg))))
    else:
        return None
    return {int(w) for w in widths} if all(isinstance(w, int) for w in widths) else None
