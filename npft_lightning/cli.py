"""Shared behaviour of the Hydra entry points: config tree, validation, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree

from npft_lightning.errors import UserError

log = logging.getLogger("npft_lightning")

# The groups shown first in the printed config tree.
_TREE_ORDER = ("model", "data", "peft", "quant", "outliers", "noise", "trainer")


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
        raise ValueError(f"unknown task {task!r}")
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
