"""Score a model without training: unquantized and fake-quantized perplexity.

    python eval.py                                             # SmolLM2, validation split, RTN4 + RTN3-g32
    python eval.py adapter=logs/npft_smollm2/runs/<run>/adapter quant=[rtn4,gptq4] splits=[validation,test]
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


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from npft_lightning.cli import run

    run(cfg, "eval")


if __name__ == "__main__":
    from npft_lightning.cli import check_group_choices, check_overrides

    conf_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conf")
    check_group_choices(sys.argv[1:], conf_dir)
    check_overrides(sys.argv[1:], conf_dir, "eval")
    main()
