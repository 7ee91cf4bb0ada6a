"""Tokenization of a whole split, cached on disk: the GPTQ protocol tokenizes the joined split once, without
special tokens; a tokenizer that starts every text with a BOS token (Gemma's) also starts every window with it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from npft_lightning.core.env import default_cache_dir
from npft_lightning.core.io import atomic_file
from npft_lightning.lm.models import ByteTokenizer

_TOKEN_CACHE_VERSION = 1  # bump when the token cache format or the tokenization rule changes


def _encode(tokenizer: Any, text: str) -> Tensor:
    """The whole text as one id stream, no special tokens (GPTQ protocol: tokenize the joined split once)."""
    kwargs = {} if isinstance(tokenizer, ByteTokenizer) else {"verbose": False}  # no "longer than max length" warning
    return torch.tensor(tokenizer.encode(text, add_special_tokens=False, **kwargs), dtype=torch.long)


def token_cache_path(corpus: Any, tokenizer: Any, split: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Cache file of a split's token ids, keyed by what determines them: corpus content, tokenizer and split."""
    vocab = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.vocab_size
    key = json.dumps([_TOKEN_CACHE_VERSION, corpus.fingerprint(), str(tokenizer.name_or_path), vocab, split])
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "tokens" / f"{corpus.name}-{split}-{digest}.pt"


def tokenize_split(corpus: Any, tokenizer: Any, split: str, cache_dir: str | os.PathLike | None = None) -> Tensor:
    """A split's token ids as a 1-D LongTensor, tokenized once and cached (SmolLM2 on 4.9 MB of wiki takes ~5 s)."""
    if type(tokenizer) is ByteTokenizer:  # instant, and the same for every corpus version: nothing to cache
        return _encode(tokenizer, corpus.text(split))
    path = token_cache_path(corpus, tokenizer, split, cache_dir)
    if path.is_file():
        try:
            return torch.load(path, weights_only=True).long()
        except Exception:  # a truncated or foreign file: tokenize again and overwrite it
            pass
    ids = _encode(tokenizer, corpus.text(split))
    storage = ids.int() if ids.numel() == 0 or int(ids.max()) < 2**31 else ids
    with atomic_file(path) as tmp:  # DDP ranks tokenizing at once never read a half-written file
        torch.save(storage, tmp)
    return ids


def window_bos(tokenizer: Any) -> int | None:
    """The token every window starts with: the BOS of a tokenizer that adds it to every text it encodes (Gemma's:
    Gemma 3 270M reads a sentence without it at PPL ~72 000, with it at 12.4), else None (SmolLM2, the byte tokenizer:
    the plain GPTQ windows)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = list(tokenizer.encode("a"))  # add_special_tokens defaults to the tokenizer's own convention
    return int(bos) if ids[:1] == [bos] else None
