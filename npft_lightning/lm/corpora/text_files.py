"""TextFiles corpus"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Sequence

from npft_lightning.core.errors import UserError
from npft_lightning.lm.corpora import DOC_SEPARATOR, SPLITS, check_split, split_of


class TextFiles:
    """Local ``.txt`` and ``.jsonl`` files (globs allowed).

    Documents are the records of a ``.jsonl`` file (its ``jsonl_field``) and the blank-line separated
    paragraphs of any other file. Give ``validation`` and ``test`` files explicitly, or only ``train``:
    then its documents are split by hash like WikiVital (1/20 test, 1/20 validation), keeping file order.
    """

    def __init__(
        self,
        train: str | Sequence[str],
        validation: str | Sequence[str] | None = None,
        test: str | Sequence[str] | None = None,
        jsonl_field: str = "text",
        name: str = "text_files",
    ) -> None:
        self.patterns = {"train": _as_list(train), "validation": _as_list(validation), "test": _as_list(test)}
        self.jsonl_field = jsonl_field
        self.name = name
        self.split_by_hash = validation is None and test is None

    def files(self, split: str) -> list[Path]:
        """The files a split reads; with ``split_by_hash`` every split reads the train files."""
        check_split(split)
        key = "train" if self.split_by_hash else split
        if not self.patterns[key]:
            raise UserError(f"corpus {self.name!r} has no {split} files; set data.corpus.{split}=[...] or give only train files")
        return [path for pattern in self.patterns[key] for path in _expand(pattern, f"data.corpus.{key}")]

    def documents(self, split: str) -> list[str]:
        docs = [doc for path in self.files(split) for doc in self._read(path)]
        if self.split_by_hash:
            docs = [doc for doc in docs if split_of(doc) == split]
        return docs

    def text(self, split: str) -> str:
        return DOC_SEPARATOR.join(self.documents(split))

    def fingerprint(self) -> str:
        digest = hashlib.sha1(f"{self.jsonl_field}|{self.split_by_hash}".encode())
        for split in SPLITS if not self.split_by_hash else ("train",):
            if not self.patterns[split]:
                continue
            for path in self.files(split):
                digest.update(f"|{split}|{path}|".encode())
                digest.update(_read_bytes(path))
        return f"text_files|{digest.hexdigest()[:16]}"

    def _read(self, path: Path) -> list[str]:
        text = _read_bytes(path).decode("utf-8", errors="replace")
        if path.suffix != ".jsonl":
            return [para.strip() for para in re.split(r"\n\s*\n", text) if para.strip()]
        docs = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            problem = jsonl_problem(line, self.jsonl_field)
            if problem:
                raise UserError(f"{path}:{line_no} {problem}")
            doc = json.loads(line)[self.jsonl_field]
            if doc:
                docs.append(str(doc))
        return docs


def jsonl_problem(line: str, field: str) -> str | None:
    """Why one ``.jsonl`` line is not a record with ``field`` (None when it is one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"is not JSON ({err.msg}); a truncated or plain-text line? fix or remove it, or name the file .txt"
    if not isinstance(record, dict) or field not in record:
        return f"is JSON but not an object with a {field!r} field; set data.corpus.jsonl_field to the field that holds the text"
    return None


def _as_list(paths: str | Sequence[str] | None) -> list[str]:
    if paths is None:
        return []
    return [paths] if isinstance(paths, (str, os.PathLike)) else [str(p) for p in paths]


def _expand(pattern: str, option: str) -> list[Path]:
    pattern = os.path.expanduser(str(pattern))
    if glob.has_magic(pattern):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise UserError(f"{option}: no files match {pattern}")
        return [Path(m) for m in matches if Path(m).is_file()]
    return [Path(pattern)]


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read text file {path}: {err.strerror or err}") from err
