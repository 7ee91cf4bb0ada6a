"""Shared behaviour of the Hydra entry points: config tree, validation, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from npft_lightning.errors import UserError

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
    """Validate, print the config, run ``task``; a :class:`UserError` becomes one line and exit code 2."""
    from lightning.pytorch.utilities import rank_zero_only

    try:
        from npft_lightning.config import validate_config

        validate_config(cfg)
        if rank_zero_only.rank == 0 and cfg.get("print_config", True):
            print_config_tree(cfg)
        if task == "train":
            from npft_lightning.pipeline import train

            return train(cfg)
        if task == "eval":
            from npft_lightning.evaluation import evaluate

            return evaluate(cfg)
        if task == "analyze":
            from npft_lightning.analysis import analyze

            return analyze(cfg)
        raise ValueError(f"unknown task {task!r}")
    except Exception as err:  # noqa: BLE001 - only user errors are shortened, everything else re-raises
        message = user_message(err)
        if message is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def user_message(err: BaseException) -> str | None:
    """The one-line message of a user error, also when Hydra's ``instantiate`` wrapped it; else None.

    A ``ValueError`` raised by one of our constructors while Hydra builds it from the config names
    the bad value and the fix, so it is shown the same way as a :class:`UserError`.
    """
    from hydra.errors import InstantiationException

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return str(err).splitlines()[0]
        if isinstance(err, InstantiationException):
            cause = err.__cause__ or err.__context__
            if isinstance(cause, (UserError, ValueError)):
                return str(cause).splitlines()[0]
        err = err.__cause__ or err.__context__
    return None


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
        for name in names:
            if name not in choices and name != "null":
                print(f"error: unknown {key} '{name}'; choose one of: {', '.join(choices)}", file=sys.stderr)
                sys.exit(2)
