"""HFDataset corpus"""

from __future__ import annotations

import os

from npft_lightning.core.errors import UserError
from npft_lightning.lm.corpora import DOC_SEPARATOR, check_split


class HFDataset:
    """A Hugging Face dataset already in the local ``datasets`` cache (e.g. WikiText-2), read offline."""

    def __init__(self, path: str = "wikitext", name: str | None = "wikitext-2-raw-v1", text_field: str = "text") -> None:
        self.path = path
        self.config_name = name
        self.text_field = text_field
        self.name = path.rsplit("/", 1)[-1] if name is None else name

    def text(self, split: str) -> str:
        check_split(split)
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"
        where = f"dataset {self.path!r}" + (f" ({self.config_name})" if self.config_name else "")
        try:
            import datasets
        except ImportError as err:
            raise UserError(
                f"{where} needs the datasets package (pip install datasets) and the dataset in its local cache; "
                "or use data.corpus=text_files with local .txt/.jsonl files"
            ) from err
        try:
            rows = datasets.load_dataset(self.path, self.config_name, split=split)
        except Exception as err:  # datasets raises many types (ConnectionError, FileNotFoundError, ValueError, ...)
            raise UserError(
                f"{where} split {split!r} is not in the local datasets cache and npft-lightning runs offline "
                f"({err.__class__.__name__}): load it once where there is internet and copy ~/.cache/huggingface here, "
                "or use data.corpus=text_files with local .txt/.jsonl files"
            ) from err
        return DOC_SEPARATOR.join(rows[self.text_field])

    def fingerprint(self) -> str:
        return f"hf|{self.path}|{self.config_name}|{self.text_field}"
