"""The training run behind ``train.py``: compose objects from the config, fit, report.

Kept out of ``train.py`` so tests and other entry points can call :func:`train` with a composed
config. The order of the NPFT callbacks matters: outliers are selected before noise is drawn on
them, and the curvature probe and fake-quant validation read the same masks and weights.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from npft_lightning.core.errors import UserError
from npft_lightning.lm.models import default_lora_targets
from npft_lightning.quant.imatrix import read_imatrix
from npft_lightning.tasks.build import (
    IMATRIX_CALIBRATION,
    build_quantizers,
    calibration_spec,
    imatrix_targets,
)
from npft_lightning.tasks.checks import (
    check_imatrix_against_model,
    validate_against_model,
    window_lengths,
)
from npft_lightning.tasks.report import print_summary
from npft_lightning.training.callbacks import (
    CurvatureProbe,
    FakeQuantValidation,
    ImportanceWeighting,
    NoisePerturbation,
    OutlierSelection,
)
from npft_lightning.training.interrupt import GracefulInterrupt
from npft_lightning.training.loggers import AlignLogOnResume
from npft_lightning.training.module import NPFTModule
from npft_lightning.training.nonfinite import NonFiniteGuard
from npft_lightning.training.run_artifacts import (
    AtomicCheckpointIO,
    RunArtifacts,
    StepClock,
)

log = logging.getLogger(__name__)


def build_callbacks(cfg: DictConfig, quantizers: dict[str, Any]) -> tuple[list[pl.Callback], dict[str, pl.Callback]]:
    """Lightning's callbacks from ``cfg.callbacks`` plus the NPFT ones, in life-cycle order."""
    callbacks: list[pl.Callback] = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c and "_target_" in c]
    if not cfg.trainer.get("enable_progress_bar", True):
        # Lightning refuses a progress-bar callback beside enable_progress_bar=false; the flag wins.
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    noise: NoisePerturbation = instantiate(cfg.noise)
    probe: CurvatureProbe | None = instantiate(cfg.curvature) if cfg.get("curvature") else None
    npft: dict[str, pl.Callback] = {}
    if cfg.get("imatrix") is not None:  # first: the fake-quant score before training is weighted too
        npft["imatrix"] = build_importance(cfg, getattr(noise.distribution, "quantizer", None), quantizers)
    if noise.enabled or probe is not None:
        npft["outliers"] = OutlierSelection(instantiate(cfg.outliers))
    if probe is not None:
        npft["curvature"] = probe
    npft["noise"] = noise
    npft["fake_quant"] = FakeQuantValidation(quantizers, calibration=calibration_spec(cfg))
    return callbacks + list(npft.values()), npft


def build_importance(cfg: DictConfig, noise_target: Any, quantizers: dict[str, Any]) -> ImportanceWeighting:
    """``imatrix``: the file read now, or ``calibration`` computed at train start; weights the noise target and the
    fake-quant quantizers that take one."""
    source = str(cfg.imatrix)
    imatrix = None if source == IMATRIX_CALIBRATION else read_imatrix(Path(source).expanduser())
    return ImportanceWeighting(imatrix_targets(noise_target, quantizers), cfg.paths.output_dir, imatrix,
                               calibration_spec(cfg), batch_size=int(cfg.data.eval_batch_size), source=source)


def build_module(cfg: DictConfig, model: torch.nn.Module) -> NPFTModule:
    """The LoRA-wrapped ``model`` with the optimizer and schedule of ``cfg`` (also used to export checkpoints)."""
    lora = instantiate(cfg.peft, _convert_="all")
    if not lora.target_modules:
        lora.target_modules = default_lora_targets(model)
    return NPFTModule(
        model, lora, optimizer=instantiate(cfg.optimizer),
        warmup_steps=cfg.schedule.warmup_steps, lr_decay=cfg.schedule.lr_decay,
        seed=cfg.seed, gradient_checkpointing=bool(cfg.get("gradient_checkpointing", False)),
    )


def build(cfg: DictConfig) -> tuple[NPFTModule, pl.LightningDataModule, pl.Trainer, dict[str, pl.Callback]]:
    """Model, data, callbacks and trainer from a composed config (shared by ``train`` and the benches)."""
    model, tokenizer = instantiate(cfg.model).load()
    quantizers = build_quantizers(cfg)
    imatrix_windows = ("calibration.length",) if cfg.get("imatrix") == IMATRIX_CALIBRATION else ()
    validate_against_model(cfg, model, tuple(dict.fromkeys(("data.seq_len",) + window_lengths(quantizers.values()) + imatrix_windows)))
    check_imatrix_against_model(cfg, model)
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    module = build_module(cfg, model)
    _check_checkpoint_fits(cfg.get("ckpt_path"), module)
    # Tokenize now (cached): a corpus shorter than one window fails here, before the Trainer starts.
    datamodule.train_windows()
    datamodule.eval_windows("validation")
    callbacks, npft = build_callbacks(cfg, quantizers)
    # Resolved here: under ddp_spawn the workers that write the artifacts have no Hydra context.
    npft["artifacts"] = RunArtifacts(cfg.paths.output_dir, OmegaConf.to_container(cfg, resolve=True), cfg.get("save_adapter", True))
    # Run safety: skip non-finite steps, Ctrl-C saves a checkpoint, a resumed run continues its CSV log.
    safety = [StepClock(), NonFiniteGuard(cfg.get("max_nonfinite_steps", 5)),
              GracefulInterrupt(resume_args(), str(cfg.paths.output_dir)), AlignLogOnResume()]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c and "_target_" in c]
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks + [npft["artifacts"], *safety], logger=loggers or False, plugins=[AtomicCheckpointIO()]
    )
    _check_launcher(trainer)
    return module, datamodule, trainer, npft


def _check_launcher(trainer: pl.Trainer) -> None:
    """Refuse ``strategy=ddp`` with ranks started by Lightning inside a Hydra sweep (it would restart the sweep).

    Lightning's ``ddp`` launcher starts ranks > 0 by re-running this command line; for ``-m`` that
    line is the whole sweep (Lightning #11300, Hydra #2070). ``ddp_spawn`` and ranks started by
    torchrun / SLURM (the submitit launcher) are fine.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    launcher = getattr(trainer.strategy, "launcher", None)
    if not isinstance(launcher, _SubprocessScriptLauncher) or trainer.world_size <= 1:
        return
    if trainer.strategy.cluster_environment.creates_processes_externally:
        return
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise UserError(
            "trainer.strategy=ddp starts its other ranks by re-running the command line, which would restart "
            "the whole Hydra sweep; use trainer=ddp_spawn (or ddp_cpu) for -m sweeps, or launch the ranks with "
            "torchrun / hydra/launcher=submitit_slurm"
        )


def completed_metrics(output_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The ``metrics.json`` of a finished run of this config in ``output_dir``, else None.

    ``skip_completed`` itself is left out of the comparison: it is typically added only for the rerun.
    """
    try:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    saved = {k: v for k, v in (metrics.get("config") or {}).items() if k != "skip_completed"}
    return metrics if saved == {k: v for k, v in config.items() if k != "skip_completed"} else None


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune, validate with fake quantization, write ``metrics.json`` and print the before/after table.

    With ``skip_completed=true`` a run whose output dir already holds the ``metrics.json`` of the
    same config returns it without training: re-running a sweep with the same ``hydra.sweep.dir``
    only runs the jobs that did not finish.
    """
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("skip_completed", False):
        done = completed_metrics(output_dir, OmegaConf.to_container(cfg, resolve=True))
        if done is not None:
            if rank_zero_only.rank == 0:
                log.info("skipped: %s already holds the metrics of this config", output_dir)
                print(f"Skipped: {output_dir / 'metrics.json'} already holds this config's results (skip_completed=true)")
            return done
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule, trainer, npft = build(cfg)
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    # RunArtifacts wrote the files on rank 0 of the training processes. Under ddp_spawn those were
    # workers, and this process reads their metrics.json back.
    metrics = npft["artifacts"].metrics
    if metrics is None and trainer.is_global_zero:
        metrics = json.loads((output_dir / "metrics.json").read_text())
    if trainer.is_global_zero:
        print_summary(metrics, output_dir)
    return metrics or {}


def _check_checkpoint_fits(ckpt: Any, module: NPFTModule) -> None:
    """A checkpoint of another model or LoRA config is one line before training, not a size-mismatch traceback (or,
    for adapters the checkpoint lacks, a resume that silently keeps them at their start)."""
    from npft_lightning.tasks.checks import CKPT_KEYWORDS

    if not ckpt or str(ckpt) in CKPT_KEYWORDS:
        return
    state = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    problem = module.adapter_mismatch(state)
    if problem:
        raise UserError(f"ckpt_path={ckpt} does not fit this run's model and LoRA config: {problem}; resume with the "
                        f"overrides of the run that wrote it (<run>/.hydra/overrides.yaml)")


def resume_args(argv0: str | None = None) -> list[str] | None:
    """``python <script> <this job's overrides>`` from Hydra's record of the job, without ``ckpt_path``; None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    overrides = [o for o in HydraConfig.get().overrides.task if o.lstrip("+~").split("=", 1)[0] != "ckpt_path"]
    return ["python", argv0 or sys.argv[0], *overrides]
