"""Every numeric option of each entry's composed config, walked: bad values are refused with one line naming the key.

For ``train``, ``eval`` and ``analyze`` the composed default config (on the tiny model) is walked leaf by leaf; every
integer or number gets NaN, ±inf, a string, a huge negative value and (for integers) a fraction, and every leaf an
interpolation that does not resolve. The config checks that run before the model loads must refuse each with one
line that names the option, unless it is listed in ``ACCEPTED`` with the reason.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from helpers import compose
from omegaconf import DictConfig, ListConfig, OmegaConf

from npft_lightning.tasks.checks import validate_config
from npft_lightning.tasks.one_line_errors import user_message

# (key, value) pairs the checks accept on purpose.
ACCEPTED = {
    ("peft.lora_alpha", 2.5): "LoRA's alpha is any positive number (the update is scaled by alpha / r)",
}


def composed(entry: str, tmp_path: Path) -> DictConfig:
    return compose(entry, "model=tiny-llama", f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}")


def leaves(node: DictConfig | ListConfig, path: str = ""):
    """(dotted key, raw value) of every leaf; interpolations are not resolved."""
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        name = f"{path}.{key}" if path else str(key)
        child = node._get_node(key)
        if isinstance(child, (DictConfig, ListConfig)):
            yield from leaves(child, name)
        else:
            yield name, child._value()


def bad_values(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return []
    trials = [math.nan, math.inf, -math.inf, "abc", -1e9]
    return trials + [2.5] if isinstance(value, int) else trials


def refusal(cfg: DictConfig, task: str) -> str | None:
    """The one line the entry would print for ``cfg``, or None when the checks accept it."""
    try:
        validate_config(cfg, task)
    except Exception as err:  # noqa: BLE001 - a traceback shows up as a missing one-line message
        message = user_message(err)
        assert message is not None, f"{type(err).__name__}: {err}"
        return message
    return None


@pytest.mark.parametrize("entry", ["train", "eval", "analyze"])
def test_every_numeric_option_refuses_bad_values_with_one_line_naming_it(entry, tmp_path):
    base = composed(entry, tmp_path)
    assert refusal(base.copy(), entry) is None  # the defaults pass
    checked, problems = 0, []
    for key, value in leaves(base):
        if key.startswith("paths.") or (isinstance(value, str) and "${" in value):
            continue
        option = re.sub(r"\.\d+$", "", key)  # a list item is named by its list
        for trial in bad_values(value):
            if (key, trial) in ACCEPTED:
                continue
            cfg = base.copy()
            OmegaConf.update(cfg, key, trial, merge=False)
            message = refusal(cfg, entry)
            checked += 1
            if message is None or "\n" in message or option not in message:
                problems.append(f"{key}={trial!r}: {message}")
    assert checked > 100
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("entry", ["train", "eval", "analyze"])
def test_an_interpolation_that_does_not_resolve_is_named_by_its_key(entry, tmp_path):
    base = composed(entry, tmp_path)
    problems = []
    for key, value in leaves(base):
        if key.startswith("paths."):
            continue
        cfg = base.copy()
        OmegaConf.update(cfg, key, "${nope.nope}", merge=False)
        message = refusal(cfg, entry) or ""
        written = re.sub(r"\.(\d+)$", r"[\1]", key)  # how the check names a list item
        if not message.startswith(f"{written}=${{nope.nope}} does not resolve"):
            problems.append(f"{key}: {message}")
    assert not problems, "\n".join(problems)
