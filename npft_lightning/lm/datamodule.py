"""Text corpora, cached tokenization and the Lightning DataModule that cuts them into fixed windows.

Evaluation follows the GPTQ protocol: the documents of a split are joined with ``"\\n\\n"``,
tokenized once without special tokens, and cut into non-overlapping windows with the tail
dropped. Training uses the same non-overlapping windows of the train split, shuffled per epoch.
For a tokenizer that starts every text with BOS (Gemma's), every window (training, evaluation,
calibration) is that BOS followed by the next ``length - 1`` tokens of the stream.
Everything is deterministic given ``seed``, and under DDP every rank sees its own disjoint shard.
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator, Sized

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from npft_lightning.core.errors import UserError
from npft_lightning.core.perplexity import cut_windows
from npft_lightning.lm.corpora import SPLITS, check_split
from npft_lightning.lm.tokens import tokenize_split, window_bos


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


class EpochShuffleSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (a permutation seeded by seed + epoch, then ``[rank::world_size]`` with the
    remainder dropped) that can resume mid-epoch.

    The order depends only on (seed, epoch), so runs and resumed runs see the same batches, and all
    ranks draw equally many windows (unequal counts would hang DDP's gradient all-reduce).
    Lightning calls ``set_epoch`` at the start of every epoch.

    ``resume_from(epoch, items)`` makes the next pass over that epoch start after its first ``items``
    indices: a run resumed from a mid-epoch checkpoint continues with the batch the interrupted run
    would have drawn next (Lightning restarts a plain map-style loader from its first batch).
    ``__len__`` stays the whole epoch, as Lightning counts the resumed batches from where it stopped.
    """

    def __init__(self, dataset: Sized, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._resume: tuple[int, int] | None = None  # (epoch, indices already consumed in it)

    def resume_from(self, epoch: int, items: int) -> None:
        self._resume = (epoch, items) if items > 0 else None

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
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
        self.bos = None if tokenizer is None else window_bos(tokenizer)
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
        check_split(split)
        if split not in self._tokens:
            if self.tokenizer is None:
                raise ValueError("CausalLMDataModule.tokenizer must be set before the data is used")
            self._tokens[split] = tokenize_split(self.corpus, self.tokenizer, split, self.cache_dir)
        return self._tokens[split]

    @property
    def _bos_tokens(self) -> int:
        """How many tokens in front of each window are not from the stream: 1 (the BOS) or 0."""
        return 0 if self.bos is None else 1

    def _with_bos(self, windows: Tensor) -> Tensor:
        if self.bos is None:
            return windows
        return torch.cat([windows.new_full((windows.size(0), 1), self.bos), windows], dim=1)

    def _windows(self, split: str, length: int, option: str) -> Tensor:
        stream = self.tokens(split)
        text = length - self._bos_tokens
        if stream.numel() < text:
            raise UserError(
                f"the {split} split of {self.corpus.name} has {stream.numel()} tokens, fewer than one window of "
                f"{option}={length}; lower data.{option} or add text"
            )
        return self._with_bos(cut_windows(stream, text))

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
        text = length - self._bos_tokens
        if stream.numel() < text:
            raise UserError(
                f"the {split} split of {self.corpus.name} has {stream.numel()} tokens, fewer than one calibration "
                f"window of {length}; lower the calibration length or add text"
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, stream.numel() - text + 1, (n,), generator=generator)
        windows = torch.stack([stream[start : start + text] for start in starts.tolist()]) if n else stream.new_empty(0, text)
        return self._with_bos(windows)

    def _rank_and_world_size(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return 0, 1
        if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise ValueError("build the Trainer with use_distributed_sampler=False: CausalLMDataModule shards its windows itself")
        return trainer.global_rank, trainer.world_size

    def train_dataloader(self) -> DataLoader:
        dataset = WindowDataset(self.train_windows())
        rank, world_size = self._rank_and_world_size()
        sampler = EpochShuffleSampler(dataset, seed=self.seed, rank=rank, world_size=world_size)
        if self._resume:
            sampler.resume_from(self._resume["epoch"], self._resume["batches"] * self.batch_size)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

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
            windows = self._tokens[split].numel() // (length - self._bos_tokens)
            if split == "train" and self.max_train_windows is not None:
                windows = min(windows, self.max_train_windows)
            if split != "train" and self.max_eval_windows is not None:
                windows = min(windows, self.max_eval_windows)
            out[split] = {"tokens": self._tokens[split].numel(), "windows": windows}
        return out
