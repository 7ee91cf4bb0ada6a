"""The corpora a study scores: the Wikipedia test (or validation) split in domain and the Python 3.11 manual out
of domain, prepared once into the cache so that one ``eval.py`` process scores both."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

from common import StudyError, load_config

CORPORA = {"wiki": "Wikipedia test split", "pydoc": "Python 3.11 manual (out of domain)",
           "wiki_val": "Wikipedia validation split (screening)"}
DEFAULT_CORPORA = ["wiki", "pydoc"]  # the final study's columns; wiki_val is for screening only
PYDOC_DEB = "python3.11-doc"
PYDOC_INFO = "usr/share/info/python3.11.info.gz"


def info_nodes(text: str) -> Iterator[tuple[str, str]]:
    """(node name, body) of each node of a GNU info file, without header lines, menus and index nodes."""
    for chunk in text.split("\x1f")[1:]:
        lines = chunk.strip("\n").split("\n")
        match = re.match(r"File: [^,]+,\s+Node: ([^,]+)", lines[0]) if lines else None
        if not match:
            continue  # the tag table and other non-node chunks
        name = match.group(1).strip()
        if "Index" in name:
            continue
        body = "\n".join(lines[1:])
        body = re.split(r"^\* Menu:\s*$", body, maxsplit=1, flags=re.M)[0]  # the menu is a list of links
        if body.strip():
            yield name, body.strip()


def prepare_python_doc(cache: Path, max_chars: int) -> tuple[Path, dict[str, Any]]:
    """The out-of-domain evaluation text: the test share (by node-name hash) of the Python manual, as .jsonl.

    Downloads the Debian package once (apt-get download + dpkg-deb -x: no install, no system change).
    """
    from npft_lightning.lm.corpora import split_of

    folder = cache / "corpora" / PYDOC_DEB
    out = folder / f"test-{max_chars}.jsonl"
    meta_path = out.with_suffix(".meta.json")
    if out.is_file() and meta_path.is_file():
        return out, json.loads(meta_path.read_text())
    info = folder / "x" / PYDOC_INFO
    if not info.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", PYDOC_DEB], cwd=folder, check=True, capture_output=True, text=True)
            deb = sorted(folder.glob(f"{PYDOC_DEB}_*_all.deb"))[-1]
            subprocess.run(["dpkg-deb", "-x", str(deb), str(folder / "x")], check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError, IndexError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            raise StudyError(f"cannot fetch {PYDOC_DEB} with apt-get download ({detail.strip()[:200]}); "
                             "pass --ood-text FILE with any .txt/.jsonl text instead") from err
    deb = sorted(folder.glob(f"{PYDOC_DEB}_*_all.deb"))
    text = gzip.decompress(info.read_bytes()).decode("utf-8", errors="replace")
    nodes = [(name, body) for name, body in info_nodes(text) if split_of(name) == "test"]
    # Evenly spaced over the whole manual (tutorial, reference, library, HOWTOs...), not its first chapters.
    fraction = min(1.0, max_chars / max(sum(len(body) for _, body in nodes), 1))
    kept = [(n, b) for i, (n, b) in enumerate(nodes) if math.floor((i + 1) * fraction) > math.floor(i * fraction)]
    records = [json.dumps({"node": name, "text": body}, ensure_ascii=False) for name, body in kept]
    total = sum(len(body) for _, body in kept)
    from npft_lightning.core.io import atomic_write_text

    atomic_write_text(out, "\n".join(records) + "\n")
    meta = {"source": deb[-1].name if deb else PYDOC_DEB, "file": PYDOC_INFO, "nodes": len(records), "chars": total,
            "selection": "info nodes (menus and index nodes dropped) with sha1(node name) % 20 == 0, in file order, "
                         f"evenly thinned to about {max_chars} characters",
            "sha1": hashlib.sha1(out.read_bytes()).hexdigest()}
    atomic_write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    return out, meta


def prepare_wiki_split(cache: Path, corpus_overrides: list[str], split: str) -> Path:
    """One split of the Wikipedia corpus as .jsonl, so one ``data=text_files`` eval can score both corpora
    (the train split calibrates GPTQ / k-means, the test split is the in-domain column)."""
    from hydra.utils import instantiate

    from npft_lightning.core.io import atomic_write_text
    from npft_lightning.lm.corpora.text_files import TextFiles

    with tempfile.TemporaryDirectory() as tmp:
        corpus = instantiate(load_config(corpus_overrides, tmp).data.corpus)
    out = cache / "corpora" / f"{corpus.name}-{split}-{corpus.fingerprint().replace('|', '_')[-16:]}.jsonl"
    if not out.is_file():
        docs = corpus.documents(split)
        atomic_write_text(out, "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs))
        if TextFiles(train=str(out), test=str(out)).text("train") != corpus.text(split):
            out.unlink()
            raise StudyError(f"the {split} split of {corpus.name} does not survive the .jsonl round trip; "
                             "cannot score it next to the out-of-domain text")
    return out


def corpus_setup(args: argparse.Namespace, cache: Path, common: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str], list[str], list[str]]:
    """The corpora to score (``args.corpora``, ``args.ood_text``, ``args.ood_chars``): their metadata, the eval.py
    split each is scored as, those splits in order, and the eval.py overrides that set them up."""
    corpora: dict[str, dict[str, Any]] = {}
    if "wiki" in args.corpora:
        corpora["wiki"] = {"source": "wiki_vital test split"}
    # Both corpora are scored by one eval.py process (each quantizer, GPTQ's calibration included, runs once
    # per model): its `validation` split is the Wikipedia test split, its `test` split the out-of-domain text.
    split_of_corpus = {"wiki": "test"}
    if "wiki_val" in args.corpora:  # the screening column: the validation split, so the test split stays unseen
        if "pydoc" in args.corpora:
            raise StudyError("--corpora wiki_val (screening) cannot be combined with pydoc; screen first, then run the final study")
        corpora["wiki_val"] = {"source": "wiki_vital validation split"}
        split_of_corpus["wiki_val"] = "validation"
    corpus_overrides: list[str] = []
    if "pydoc" in args.corpora:
        if args.ood_text:
            ood, meta = Path(args.ood_text).expanduser().resolve(), {"source": args.ood_text}
        else:
            ood, meta = prepare_python_doc(cache, args.ood_chars)
        corpora["pydoc"] = meta
        wiki_test = prepare_wiki_split(cache, common, "test") if "wiki" in corpora else ood
        corpus_overrides = ["data=text_files", f"data.corpus.train={prepare_wiki_split(cache, common, 'train')}",
                            f"data.corpus.validation={wiki_test}", f"data.corpus.test={ood}"]
        split_of_corpus = {"wiki": "validation", "pydoc": "test"}
    split_of_corpus = {c: s for c, s in split_of_corpus.items() if c in corpora}
    splits = sorted(split_of_corpus.values(), key=["validation", "test"].index)
    return corpora, split_of_corpus, splits, corpus_overrides
