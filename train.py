"""Fine-tune a causal LM with NPFT and validate it under fake quantization.

    python train.py                                    # SmolLM2-135M + Wikipedia, the default recipe
    python train.py model=opt-1.3b quant=rtn4          # any model / quantizer config group
    python train.py -m noise.scale=0,0.5,1,2           # a Hydra sweep
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
# Deprecation chatter from transformers/Lightning internals is not actionable for users of this tool.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from npft_lightning.cli import run

    run(cfg, "train")


if __name__ == "__main__":
    from npft_lightning.cli import check_group_choices, check_overrides

    conf_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
    check_group_choices(sys.argv[1:], conf_dir)
    check_overrides(sys.argv[1:], conf_dir, "train")
    main()
