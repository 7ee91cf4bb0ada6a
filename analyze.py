"""Robustness analysis without training: perplexity under artificial perturbations of the weights or
activations of the decoder linears, and under weight / activation fake quantization.

    python analyze.py                                                   # SmolLM2, the default perturbation kinds
    python analyze.py perturb=[w_uniform_range,a_uniform_element] quant=[w8a8,w4a8,w4a16]
    python analyze.py adapters='{pretrained:null,control:runs/control/adapter,npft:runs/npft/adapter}'
"""

from __future__ import annotations

import os
import sys
import warnings

import hydra
from omegaconf import DictConfig

from npft_lightning.core.env import set_offline_defaults

set_offline_defaults()  # before any Hugging Face library is imported: this tool never downloads

os.environ.setdefault("PROJECT_ROOT", os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore", category=FutureWarning)


@hydra.main(version_base="1.3", config_path="conf", config_name="analyze")
def main(cfg: DictConfig) -> None:
    from npft_lightning.cli import run

    run(cfg, "analyze")


if __name__ == "__main__":
    from npft_lightning.cli import check_group_choices, check_overrides

    conf_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
    check_group_choices(sys.argv[1:], conf_dir)
    check_overrides(sys.argv[1:], conf_dir, "analyze")
    main()
