"""Text corpora: each family a module with a class whose ``text(split)`` is the split's documents joined by
:data:`DOC_SEPARATOR` and whose ``fingerprint()`` keys the token cache.

Documents are assigned to a split by the hash of their key (:func:`split_of`), so the splits are the same
on every machine and never overlap.
"""

from __future__ import annotations

import hashlib

# The splits every corpus is cut into, the names eval.py's ``splits`` and analyze.py's ``split`` take.
SPLITS = ("train", "validation", "test")


DOC_SEPARATOR = "\n\n"


def split_of(key: str) -> str:
    """Deterministic document split by hash: 1 in 20 to test, 1 in 20 to validation, the rest to train."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
