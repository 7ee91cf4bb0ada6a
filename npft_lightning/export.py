"""A PEFT adapter folder from any training checkpoint (``step_*.ckpt``, ``last.ckpt``).

    python -m npft_lightning.export logs/train/runs/<run>/checkpoints/step_000050.ckpt
    python eval.py adapter=logs/train/runs/<run>/checkpoints/step_000050_adapter    # then score it

Checkpoints hold only the adapters (plus optimizer and loop state), so the base model is rebuilt
from the run's config (``<run>/.hydra/config.yaml`` by default), the adapter weights are loaded into
it, and ``save_pretrained`` writes the same folder format as a run's ``adapter/``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from npft_lightning.errors import UserError
from npft_lightning.io import atomic_dir


def run_config(ckpt_path: str | Path) -> DictConfig:
    """The config of the run that wrote ``ckpt_path``: ``<run>/.hydra/config.yaml`` for ``<run>/checkpoints/x.ckpt``."""
    path = Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    if not path.is_file():
        raise UserError(f"no run config at {path}; pass --config <run dir>/.hydra/config.yaml")
    return OmegaConf.load(path)


def adapter_from_checkpoint(ckpt_path: str | Path, cfg: DictConfig | None = None, out_dir: str | Path | None = None) -> Path:
    """Write the adapters of ``ckpt_path`` as a PEFT folder (default ``<ckpt without .ckpt>_adapter``); returns it."""
    from npft_lightning.pipeline import build_module

    ckpt_path = Path(ckpt_path)
    cfg = cfg if cfg is not None else run_config(ckpt_path)
    out = Path(out_dir) if out_dir is not None else ckpt_path.with_name(f"{ckpt_path.stem}_adapter")
    model, _ = instantiate(cfg.model).load()
    module = build_module(cfg, model)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
    result = module.load_state_dict(state, strict=False)
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    missing = trainable.intersection(result.missing_keys)
    if result.unexpected_keys or missing:
        raise UserError(
            f"{ckpt_path} does not match the model and LoRA config of the run ({len(missing)} adapter tensors missing, "
            f"{len(result.unexpected_keys)} unexpected); pass the run's --config"
        )
    with atomic_dir(out) as tmp:  # a crash never leaves half an adapter folder
        module.model.save_pretrained(str(tmp))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the LoRA adapters of a training checkpoint as a PEFT folder.")
    parser.add_argument("checkpoint", help="a .ckpt written by train.py (<run>/checkpoints/...)")
    parser.add_argument("--config", default=None, help="the run's config (default: <run>/.hydra/config.yaml)")
    parser.add_argument("--out", default=None, help="the adapter folder to write (default: <checkpoint>_adapter)")
    args = parser.parse_args(argv)
    cfg = OmegaConf.load(args.config) if args.config else None
    print(adapter_from_checkpoint(args.checkpoint, cfg, args.out))


if __name__ == "__main__":
    main()
