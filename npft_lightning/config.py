"""Checks on the composed config that run before anything heavy is loaded, so errors come in seconds.

Each problem raises :class:`UserError` with one line naming the bad value and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path

from omegaconf import DictConfig

from npft_lightning.errors import UserError


def _check_quant(name: str, q: DictConfig) -> None:
    # Nested parts: the base of dense-and-sparse, the weight and activation parts of W/A quantizers.
    for part in ("base", "weight", "activation"):
        if isinstance(q.get(part), DictConfig):
            _check_quant(f"{name}.{part}", q[part])
    clip = q.get("clip_ratio")
    if clip is not None and not (isinstance(clip, (int, float)) and 0 < clip <= 1):
        raise UserError(f"quant.{name}.clip_ratio={clip} must be in (0, 1]; 1 = no clipping")
    bits = q.get("bits")
    if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 8):
        raise UserError(f"quant.{name}.bits={bits} is outside 2..8; use an integer from 2 to 8")
    group = q.get("group_size")
    if group is not None and not (isinstance(group, int) and group > 0):
        raise UserError(f"quant.{name}.group_size={group} must be a positive integer (a divisor of the input features) or null")


def validate_config(cfg: DictConfig) -> None:
    for name, q in (cfg.get("quant") or {}).items():
        if not isinstance(q, DictConfig) or "_target_" not in q:
            raise UserError(f"quant.{name} is not a quantizer config (no _target_); pick one from conf/quant/")
        _check_quant(name, q)

    noise = cfg.get("noise")
    if noise is not None:
        scale = noise.get("scale")
        if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0):
            raise UserError(f"noise.scale={scale} must be a finite number >= 0 (0 = no noise; noise=none is the control)")
        if noise.get("schedule") not in (None, "per_step", "per_epoch"):
            raise UserError(f"noise.schedule={noise.get('schedule')} is not one of per_step, per_epoch")

    outliers = cfg.get("outliers")
    if outliers is not None:
        ratio = outliers.get("ratio")
        if not isinstance(ratio, (int, float)) or not (0 < ratio <= 100):
            raise UserError(f"outliers.ratio={ratio} must be a percentage in (0, 100]; 0.05 means 0.05 % of each matrix")

    corpus = (cfg.get("data") or {}).get("corpus") or {}
    if str(corpus.get("_target_", "")).endswith("TextFiles"):
        import glob

        for split in ("train", "validation", "test"):
            patterns = corpus.get(split) or []
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                path = Path(str(pattern)).expanduser()
                matches = glob.glob(str(path)) if glob.has_magic(str(path)) else [str(path)] if path.is_file() else []
                if not matches:
                    raise UserError(f"data.corpus.{split}: {pattern} matches no readable file; give .txt or .jsonl paths or globs")

    model = cfg.get("model")
    if model is not None and model.get("path"):
        path = Path(str(model.path)).expanduser()
        if not path.is_dir():
            raise UserError(f"model.path={model.path} does not exist; give a folder with config.json and the weights")
        if not (path / "config.json").is_file():
            raise UserError(f"model.path={model.path} has no config.json, so it is not a Hugging Face model folder")


def validate_against_model(cfg: DictConfig, model) -> None:
    """Checks that need the model's shapes (seconds after loading, before any training or evaluation)."""
    from npft_lightning.layers import decoder_linears
    from npft_lightning.models import max_context

    context = max_context(model)
    data = cfg.get("data") or {}
    for key in ("seq_len", "eval_seq_len"):
        length = data.get(key)
        if length is not None and context and length > context:
            raise UserError(f"data.{key}={length} is longer than the model's context of {context} tokens; use data.{key}<={context}")
    linears = decoder_linears(model)
    for qname, q in (cfg.get("quant") or {}).items():
        groups = [q.get("group_size"), (q.get("base") or {}).get("group_size"), (q.get("weight") or {}).get("group_size")]
        for group in (g for g in groups if g):
            for lname, linear in linears.items():
                if linear.in_features % group:
                    raise UserError(
                        f"quant.{qname}.group_size={group} does not divide the {linear.in_features} input features of "
                        f"{lname}; pick a divisor of {linear.in_features} (e.g. 32 or 64) or null for per-channel"
                    )
    peft = cfg.get("peft") or {}
    targets = peft.get("target_modules")
    if targets:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linears})
        missing = [t for t in targets if t not in leaf_names]
        if missing:
            raise UserError(f"peft.target_modules {missing} match no linear layer of this model; its decoder linears are {leaf_names}")
