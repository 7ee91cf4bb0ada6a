"""Shared behaviour of the Hydra entry points: config tree, validation, one-line errors."""

from __future__ import annotations

import logging
import signal
import sys
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from npft_lightning.tasks.one_line_errors import one_line_errors

log = logging.getLogger("npft_lightning")

# The groups shown first in the printed config tree.
_TREE_ORDER = ("model", "data", "peft", "quant", "perturb", "outliers", "noise", "trainer")


def print_config_tree(cfg: DictConfig, console: Console | None = None) -> None:
    """The composed config as a Rich tree, one branch per group."""
    console = console or Console()
    tree = Tree("config", guide_style="dim")
    keys = [k for k in _TREE_ORDER if k in cfg] + [k for k in cfg if k not in _TREE_ORDER and k != "paths"]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", background_color="default"))
    console.print(tree)




def run(cfg: DictConfig, task: str) -> Any:
    """Validate, print the config, run ``task``; a :class:`UserError` becomes one line and exit code 2.

    Ctrl-C and SIGTERM stop the task within seconds wherever they arrive (:mod:`npft_lightning.core.interrupt`,
    installed here, before the model loads); the run exits with 130 (SIGINT) or 143 (SIGTERM) after one
    line saying what was saved (a training checkpoint, the results measured so far) and how to go on.
    """
    from npft_lightning.core import interrupt

    interrupt.install()
    try:
        with one_line_errors():
            from npft_lightning.tasks.checks import validate_config
            from npft_lightning.tasks.legacy import upgrade_targets

            upgrade_targets(cfg)  # a config of a run written before the layering (--config-path <run>/.hydra)
            validate_config(cfg, task)
            from lightning.pytorch.utilities import rank_zero_only

            if rank_zero_only.rank == 0 and cfg.get("print_config", True):
                print_config_tree(cfg)
            if task == "train":
                from npft_lightning.tasks.train import train

                return train(cfg)
            if task == "eval":
                from npft_lightning.tasks.evaluate import evaluate

                return evaluate(cfg)
            if task == "analyze":
                from npft_lightning.tasks.analyze import analyze

                return analyze(cfg)
            raise ValueError(f"unknown task {task!r}")
    except (interrupt.Interrupted, KeyboardInterrupt, SystemExit) as err:
        signum = err.signum if isinstance(err, interrupt.Interrupted) else interrupt.received()
        if isinstance(err, KeyboardInterrupt) and signum is None:
            signum = signal.SIGINT  # Python's own Ctrl-C handler: the handlers were not installed in this thread
        if signum is None or (isinstance(err, SystemExit) and not _lightning_sigterm(err)):
            raise
        _exit_interrupted(signum, task, forced=getattr(err, "forced", False))


def _lightning_sigterm(err: SystemExit) -> bool:
    """Lightning ends a fit that got SIGTERM with its ``SIGTERMException`` (a ``SystemExit`` with code None)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    return isinstance(err, SIGTERMException)


def _exit_interrupted(signum: int, task: str, forced: bool) -> NoReturn:
    """One line (rank 0) saying what was saved and how to go on, and the shell's exit code of a death by ``signum``."""
    from lightning.pytorch.utilities import rank_zero_only

    from npft_lightning.core import interrupt

    saved = None if forced else interrupt.outcome()
    if saved is None:
        when = " twice, stopped at once" if forced else " before training started" if task == "train" else ""
        saved = f"{when}; nothing was saved, run the same command again"
    if rank_zero_only.rank == 0:
        print(f"interrupted by {interrupt.signal_name(signum)}{saved}", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def check_group_choices(argv: list[str], conf_dir: str) -> None:
    """Unknown config-group options on the command line -> one line listing the valid ones, exit code 2.

    Hydra's own message spans several lines; this check runs before Hydra composes anything.
    Handles ``group=name``, sweeps ``group=a,b`` and lists ``group=[a,b]``.
    """
    from pathlib import Path

    root = Path(conf_dir)
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        group_dir = root / key
        if "." in key or not group_dir.is_dir():
            continue
        choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
        names = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if "null" in names:  # Hydra answers a group set to null with a traceback
            print(f"error: {key}=null: {key} is a config group, not a value; choose one of: {', '.join(choices)}"
                  f" (or drop the group with ~{key})", file=sys.stderr)
            sys.exit(2)
        for name in names:
            if name not in choices:
                print(f"error: unknown {key} '{name}'; choose one of: {', '.join(choices)}", file=sys.stderr)
                sys.exit(2)


def check_overrides(argv: list[str], conf_dir: str, config_name: str) -> None:
    """Overrides of keys the config lacks, and a run folder that cannot be created -> one line, exit code 2.

    Hydra reports the first with a multi-line message and the second with a traceback, both before
    the task function runs; so the config is composed once here (Hydra's compose API, about 0.2 s)
    and checked. Sweeps are composed with their first value. Anything else Hydra reports itself.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException

    multirun = any(a in ("-m", "--multirun") for a in argv)
    try:
        parsed = OverridesParser.create().parse_overrides([a for a in argv if not a.startswith("-")])
    except Exception:  # noqa: BLE001 - Hydra's own parser message is clear enough
        return
    overrides = [f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}" if o.is_sweep_override() else o.input_line
                 for o in parsed]

    def composed(items: list[str]) -> DictConfig:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=conf_dir, version_base="1.3", job_name=config_name):
                return compose(config_name, overrides=items, return_hydra_config=True)
        finally:
            GlobalHydra.instance().clear()

    try:
        cfg = composed(overrides)
    except ConfigCompositionException as err:
        message = _override_message(str(err), overrides, composed)
        if message is None:
            return
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception:  # noqa: BLE001 - not ours to report
        return

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        run_dir = OmegaConf.select(cfg, key)
    except Exception:  # noqa: BLE001 - an interpolation only Hydra's run can resolve
        return
    if run_dir:
        from npft_lightning.core.errors import UserError
        from npft_lightning.core.fs import check_writable_dir

        try:
            check_writable_dir(key, run_dir, f"point {key} (or paths.log_dir) to a writable folder", create=False)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)


def _override_message(text: str, overrides: list[str], composed) -> str | None:
    """One line for Hydra's "Could not override / append / delete" errors, naming the nearest existing key."""
    import difflib

    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Could not"):
        return None
    bad = next((o for o in overrides if f"'{o.lstrip('+~').split('=', 1)[0]}'" in lines[0]), None)
    if bad is None:
        return " ".join(line.strip() for line in lines if not line.startswith(" "))
    key = bad.lstrip("+~").split("=", 1)[0]
    if bad.startswith("~"):
        return f"cannot delete {key}: the config has no such key ({bad}); check the spelling"
    if bad.startswith("+"):
        return f"{key} is already in the config ({bad}); set it without the +: {bad.lstrip('+')}"
    try:
        known = _dotted_keys(composed([o for o in overrides if o is not bad]))
    except Exception:  # noqa: BLE001 - no suggestion then
        known = []
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]}? " if close else ""
    return f"{key} is not a config key ({bad}); {hint}to add a new key write +{bad}"


def _dotted_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg.keys():
        if prefix == "" and key == "hydra":
            continue
        path = f"{prefix}{key}"
        keys.append(path)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys.extend(_dotted_keys(value, path + "."))
    return keys
