"""A PEFT adapter folder from any training checkpoint (``step_*.ckpt``, ``last.ckpt``).

    python -m npft_lightning export logs/npft_smollm2/runs/<run>/checkpoints/step_000050.ckpt
    python eval.py adapter=logs/npft_smollm2/runs/<run>/checkpoints/step_000050_adapter    # then score it

Checkpoints hold only the adapters (plus optimizer and loop state), so the base model is rebuilt
from the run's config (``<run>/.hydra/config.yaml`` by default), the adapter weights are loaded into
it, and ``save_pretrained`` writes the same folder format as a run's ``adapter/``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from npft_lightning.core.errors import UserError
from npft_lightning.core.io import atomic_dir
from npft_lightning.tasks.legacy import upgrade_targets


def run_config(ckpt_path: str | Path, config: str | Path | None = None) -> DictConfig:
    """The config of the run that wrote ``ckpt_path``: ``config`` (``--config``), else ``<run>/.hydra/config.yaml``
    for ``<run>/checkpoints/x.ckpt``; one line when it is missing or not a ``train.py`` run config."""
    key = "--config"
    path = Path(config).expanduser() if config is not None else Path(ckpt_path).resolve().parent.parent / ".hydra" / "config.yaml"
    fix = "pass --config <run dir>/.hydra/config.yaml of the run that wrote the checkpoint"
    if not path.is_file():
        raise UserError(f"{key}={config} does not exist; {fix}" if config is not None else f"no run config at {path}; {fix}")
    try:
        cfg = OmegaConf.load(path)
    except Exception as err:  # noqa: BLE001 - YAML and OmegaConf errors alike: not a config file
        raise UserError(f"{key}={path} cannot be read as a YAML config ({err.__class__.__name__}); {fix}") from err
    missing = [k for k in ("model", "peft", "optimizer", "schedule") if not isinstance(cfg, DictConfig) or k not in cfg]
    if missing:
        raise UserError(f"{key}={path} is not the config of a train.py run (it has no {', '.join(missing)}); {fix}")
    upgrade_targets(cfg)  # a run written before the layering names the old class paths
    return cfg


def check_args(ckpt_path: str | Path, out: str | Path | None) -> tuple[Path, Path]:
    """The command line, before the model loads: a readable training checkpoint and a writable adapter folder to replace.

    Returns the checkpoint and the adapter folder (default ``<checkpoint without .ckpt>_adapter``).
    """
    from npft_lightning.core.fs import check_checkpoint, check_output_dir

    check_checkpoint("checkpoint", ckpt_path, "give a .ckpt that train.py wrote (<run>/checkpoints/last.ckpt or step_*.ckpt)")
    ckpt_path = Path(ckpt_path).expanduser()
    out = Path(out).expanduser() if out is not None else ckpt_path.with_name(f"{ckpt_path.stem}_adapter")
    check_output_dir("--out", out, "adapter_config.json", "an adapter folder", "pass --out <a new or adapter folder that can be written>")
    return ckpt_path, out


def adapter_from_checkpoint(ckpt_path: str | Path, cfg: DictConfig | None = None, out_dir: str | Path | None = None) -> Path:
    """Write the adapters of ``ckpt_path`` as a PEFT folder (default ``<ckpt without .ckpt>_adapter``); returns it."""
    from npft_lightning.tasks.train import build_module

    ckpt_path, out = check_args(ckpt_path, out_dir)
    cfg = cfg if cfg is not None else run_config(ckpt_path)
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
    from npft_lightning.tasks.checks import _check_model
    from npft_lightning.tasks.one_line_errors import ArgumentParser, one_line_errors

    parser = ArgumentParser(prog="python -m npft_lightning export",
                            description="Export the LoRA adapters of a training checkpoint as a PEFT folder.")
    parser.add_argument("checkpoint", help="a .ckpt written by train.py (<run>/checkpoints/...)")
    parser.add_argument("--config", default=None, help="the run's config (default: <run>/.hydra/config.yaml)")
    parser.add_argument("--out", default=None, help="the adapter folder to write (default: <checkpoint>_adapter)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)  # as in train.py: library deprecation chatter
    with one_line_errors():
        check_args(args.checkpoint, args.out)
        cfg = run_config(args.checkpoint, args.config)
        _check_model(cfg.model)  # e.g. a model.path that has moved since the run
        print(adapter_from_checkpoint(args.checkpoint, cfg, args.out))


if __name__ == "__main__":
    main()
