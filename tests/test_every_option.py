"""Every option of each entry's composed config, walked: bad values are refused with one line naming the key.

For ``train``, ``eval`` and ``analyze`` the composed default config (on the tiny model) is walked leaf by leaf, and
so are configs that select the newer options (``CONFIGS``: the exact-error target ``noise.distribution.quantizer``,
ReQuant, the GGUF / llama.cpp options of ``eval.py``, every analysis perturbation of conf/perturb): every integer or
number gets NaN, ±inf, a string, a huge negative value and (for integers) a fraction, every string an unknown
value, and every leaf an interpolation that does not resolve. The config checks that run before the model loads
must refuse each with one line that names the option, unless it is listed in ``ACCEPTED`` / ``FREE_TEXT`` with the
reason.
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import pytest
from helpers import ROOT, compose
from omegaconf import DictConfig, ListConfig, OmegaConf

from npft_lightning.tasks.checks import validate_config
from npft_lightning.tasks.one_line_errors import user_message

# (option, value) pairs the checks accept on purpose; the option is the last named part of the key.
ACCEPTED = {
    ("lora_alpha", 2.5): "LoRA's alpha is any positive number (the update is scaled by alpha / r)",
    ("outlier_candidates", 2.5): "ReQuant's candidates are factors of the outlier ratio: any number >= 0",
}
# String options that take any text (labels and file names), by the last part of their key.
FREE_TEXT = {
    "task_name": "names the run folder, logs/<task_name>/runs/...",
    "name": "a label: the model's, a quantizer's column or a perturbation's rows in the results",
    "version": "the CSV logger's folder name",
    "filename": "the checkpoints' file-name template",
}
LLAMACPP = importlib.util.find_spec("llama_cpp") is not None
# The configs walked: the defaults of each entry, and ones that select the newer options.
CONFIGS = {
    "train": ("train", []),
    "eval": ("eval", []),
    "analyze": ("analyze", []),
    "train, exact-error noise": ("train", ["noise=quant_error", "quant=[requant_rtn4,requant_gptq3_g32]"]),
    "eval, requant": ("eval", ["quant=[requant_rtn4,requant_kmeans3,requant_nf4,gptq4,kmeans4]"]),
    "eval, gguf and llama.cpp": ("eval", ["quant=[q4_0,q4_k]", "gguf_out={tmp}/m.gguf", "llamacpp_threads=2",
                                          *(["llamacpp_ppl=true", "llamacpp_types=[Q4_K_M]", "imatrix=true"] if LLAMACPP else [])]),
    "analyze, every perturbation": ("analyze", ["perturb=[" + ",".join(sorted(p.stem for p in (ROOT / "conf" / "perturb").glob("*.yaml")
                                                                              if p.stem != "none")) + "]", "quant=[w8a8,w4a8]"]),
}


def composed(entry: str, tmp_path: Path, extra: list[str] | tuple[str, ...] = ()) -> DictConfig:
    return compose(entry, "model=tiny-llama", f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}",
                   *(o.format(tmp=tmp_path) for o in extra))


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
    """The one line the entry would print for ``cfg``, or None when the checks accept it; a traceback is a multi-line
    text (so that every caller counts it as a problem)."""
    try:
        validate_config(cfg, task)
    except Exception as err:  # noqa: BLE001 - a traceback shows up as a missing one-line message
        message = user_message(err)
        return message if message is not None else f"a traceback:\n{type(err).__name__}: {err}"
    return None


@pytest.mark.parametrize("config", CONFIGS)
def test_every_numeric_option_refuses_bad_values_with_one_line_naming_it(config, tmp_path):
    entry, extra = CONFIGS[config]
    base = composed(entry, tmp_path, extra)
    assert refusal(base.copy(), entry) is None  # the defaults pass
    checked, problems = 0, []
    for key, value in leaves(base):
        if key.startswith("paths.") or (isinstance(value, str) and "${" in value):
            continue
        option = re.sub(r"\.\d+$", "", key)  # a list item is named by its list
        for trial in bad_values(value):
            if (option.rsplit(".", 1)[-1], trial) in ACCEPTED:
                continue
            cfg = base.copy()
            OmegaConf.update(cfg, key, trial, merge=False)
            message = refusal(cfg, entry)
            checked += 1
            if message is None or "\n" in message or option not in message:
                problems.append(f"{key}={trial!r}: {message}")
    assert checked > 100
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_string_option_refuses_an_unknown_value_with_one_line_naming_it(config, tmp_path):
    """Choices, class paths (``_target_``), file types, devices, splits: an unknown value is refused naming the key."""
    entry, extra = CONFIGS[config]
    base = composed(entry, tmp_path, extra)
    checked, problems = 0, []
    for key, value in leaves(base):
        if key.startswith("paths.") or not isinstance(value, str) or "${" in value or key.rsplit(".", 1)[-1] in FREE_TEXT:
            continue
        if key.startswith("gguf_out"):
            continue  # a file name: any name is fine, and its folder's checks are in tests/test_config_errors.py
        option = re.sub(r"\.\d+$", "", key)
        cfg = base.copy()
        OmegaConf.update(cfg, key, "zz_unknown", merge=False)
        message = refusal(cfg, entry)
        checked += 1
        if message is None or "\n" in message or option not in message:
            problems.append(f"{key}=zz_unknown: {message}")
    assert checked > 5
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("config", CONFIGS)
def test_an_interpolation_that_does_not_resolve_is_named_by_its_key(config, tmp_path):
    entry, extra = CONFIGS[config]
    base = composed(entry, tmp_path, extra)
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
