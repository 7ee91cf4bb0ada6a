"""Config checks of the scoring entry points, ``eval.py`` and ``analyze.py``: their own options, before the model loads.

The groups they share with ``train.py`` (model, data, quant, outliers, paths) are checked by
:func:`npft_lightning.tasks.checks.validate_config`, which calls :func:`validate_scoring_config` last. The
checks against the loaded model (window lengths, group sizes, the adapter's shapes) run in
:func:`npft_lightning.tasks.evaluate.load_for_eval`, before anything is scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig

from npft_lightning.core.errors import UserError
from npft_lightning.core.fs import check_output_dir, check_writable_dir
from npft_lightning.lm.adapters import check_adapter_folder
from npft_lightning.lm.corpora import SPLITS
from npft_lightning.tasks.check_values import (
    check_device,
    is_int,
    is_number,
    positive_int,
)

if TYPE_CHECKING:
    from npft_lightning.npft.perturb import Perturbation

OUTLIERS_ON = ("pretrained", "self")


def splits_of(cfg: DictConfig) -> list[str]:
    """``splits`` of eval.py as a list: ``splits=test`` is taken as ``splits=[test]``."""
    splits = cfg.get("splits")
    return [splits] if isinstance(splits, str) else list(splits or [])


def variants_of(cfg: DictConfig) -> dict[str, str | None]:
    """Variant name -> adapter folder (None = the pretrained model): ``cfg.adapters``, else the single ``cfg.adapter``."""
    adapters = cfg.get("adapters") or {}
    if adapters:
        return {str(k): (None if v in (None, "", "null") else str(v)) for k, v in adapters.items()}
    adapter = cfg.get("adapter")
    return {"adapter" if adapter else "pretrained": adapter or None}


def build_perturbations(cfg: DictConfig) -> list[Perturbation]:
    """``cfg.perturb`` is a dict of named perturbation configs (``perturb=[w_uniform_element,...]`` selects several)."""
    from hydra.utils import instantiate

    out = []
    for key, pcfg in (cfg.get("perturb") or {}).items():
        if not isinstance(pcfg, DictConfig) or "_target_" not in pcfg:
            raise UserError(f"perturb.{key} is not a perturbation config (no _target_); pick one from conf/perturb/")
        out.append(instantiate(pcfg, name=pcfg.get("name") or key, _convert_="all"))
    return out


def adapter_key(cfg: DictConfig, variant: str) -> str:
    """The option that named a variant's adapter folder, for messages: ``adapters.<variant>`` or ``adapter``."""
    return f"adapters.{variant}" if cfg.get("adapters") else "adapter"


def _check_split(key: str, split: Any) -> None:
    if split not in SPLITS:
        raise UserError(f"{key}: {split!r} is not a split; choose from {', '.join(SPLITS)}")


def _check_export_dir(cfg: DictConfig) -> None:
    """The export folder is proven writable, and every quantizer exportable, before anything is scored."""
    from npft_lightning.tasks.build import build_quantizers

    export_dir = cfg.get("export_dir")
    fix = "point export_dir to a writable folder of its own, or drop export_dir"
    check_writable_dir("export_dir", export_dir, fix, create=False)
    quantizers = build_quantizers(cfg)
    if not quantizers:
        raise UserError(f"export_dir={export_dir} has nothing to hold: quant selects no quantizer; pick one (e.g. quant=rtn4) "
                        f"or drop export_dir")
    runtime = [name for name, q in quantizers.items() if getattr(q, "activation", None) is not None]
    if runtime:
        raise UserError(f"export_dir cannot hold {', '.join(runtime)}: activation quantization happens at run time; "
                        f"export the weight-only quantizers (e.g. quant=rtn4) or drop export_dir")
    for name in quantizers:
        check_output_dir("export_dir", Path(str(export_dir)).expanduser() / name, "quant_config.json", "a quantized artefact", fix)


def _check_perturbations(cfg: DictConfig) -> None:
    for name, p in (cfg.get("perturb") or {}).items():
        magnitudes = p.get("magnitudes") if isinstance(p, DictConfig) else None
        if magnitudes is not None and not isinstance(magnitudes, ListConfig):
            raise UserError(f"perturb.{name}.magnitudes={magnitudes} must be a list, e.g. perturb.{name}.magnitudes=[{magnitudes}]")
        if magnitudes is not None and not all(is_number(m) and m >= 0 for m in magnitudes):
            raise UserError(f"perturb.{name}.magnitudes={list(magnitudes)} must be a non-empty list of finite numbers >= 0")
        ratio = p.get("ratio") if isinstance(p, DictConfig) else None
        if ratio is not None and not (is_number(ratio) and 0 < ratio <= 100):
            raise UserError(f"perturb.{name}.ratio={ratio} must be a percentage in (0, 100]")
        group = p.get("group_size") if isinstance(p, DictConfig) else None
        if group is not None and not (is_int(group) and group > 0):
            raise UserError(f"perturb.{name}.group_size={group} must be a positive divisor of the features, or null")
    build_perturbations(cfg)  # each kind's constructor checks its values (empty magnitudes among them)


def _check_llamacpp_options(cfg: DictConfig) -> None:
    """The GGUF / llama.cpp options whose value alone is enough to refuse, also when nothing reads them yet."""
    from npft_lightning.quant.gguf_export import FLOAT_TYPES, check_gguf_vocab

    if cfg.get("gguf_vocab"):
        check_gguf_vocab("gguf_vocab", str(cfg.gguf_vocab))
    float_type = cfg.get("llamacpp_float")
    if float_type is not None and str(float_type).lower() not in FLOAT_TYPES:
        raise UserError(f"llamacpp_float={float_type} is not one of {', '.join(FLOAT_TYPES)} (the float GGUF llama.cpp quantizes from)")
    positive_int("llamacpp_threads", cfg.get("llamacpp_threads"), "llama.cpp's CPU threads (null = torch's thread count)",
                 allow_none=True)
    if cfg.get("llamacpp_ppl") not in (None, True, False):
        raise UserError(f"llamacpp_ppl={cfg.get('llamacpp_ppl')} must be true or false")


def validate_scoring_config(cfg: DictConfig, task: str) -> None:
    """``eval.py`` / ``analyze.py`` options: splits, adapter folders, device, export folder, perturbations."""
    if task == "eval":
        splits = splits_of(cfg)
        if not splits:
            raise UserError("splits=[] selects no split to score; give one or more of "
                            f"{', '.join(SPLITS)}, e.g. splits=[validation,test]")
        for split in splits:
            _check_split(f"splits={splits}", split)
    else:
        _check_split(f"split={cfg.get('split')}", cfg.get("split"))

    adapters = cfg.get("adapters")
    if adapters is not None and not isinstance(adapters, DictConfig):
        raise UserError(f"adapters={adapters} must map names to adapter folders (null = the pretrained model), "
                        "e.g. adapters='{pretrained:null,npft:logs/npft_smollm2/runs/<run>/adapter}'")
    for variant, adapter in variants_of(cfg).items():
        if adapter:
            check_adapter_folder(adapter_key(cfg, variant), adapter)

    check_device("device", cfg.get("device"))
    if task == "eval":
        _check_llamacpp_options(cfg)
    if task == "eval" and cfg.get("export_dir"):
        _check_export_dir(cfg)
    if task == "eval" and (cfg.get("gguf_out") or cfg.get("llamacpp_ppl")):
        from npft_lightning.tasks.build import build_quantizers
        from npft_lightning.tasks.gguf_plan import plan_gguf_export

        plan_gguf_export(cfg, build_quantizers(cfg))  # ggml quantizers, a supported model, a writable file
    if task == "eval" and (cfg.get("llamacpp_types") or cfg.get("imatrix")):
        from npft_lightning.tasks.gguf_plan import plan_llamacpp_files

        plan_llamacpp_files(cfg)  # known file types, an imatrix with calibration windows, a llama model, writable files

    if task == "analyze":
        if cfg.get("outliers_on") not in OUTLIERS_ON:
            raise UserError(f"outliers_on={cfg.get('outliers_on')} is not one of {', '.join(OUTLIERS_ON)}")
        _check_perturbations(cfg)
        if not cfg.get("perturb") and not cfg.get("quant"):
            raise UserError("nothing to analyze: select perturbations (perturb=[w_uniform_element,...]) and/or quantizers (quant=[w8a8,...])")
