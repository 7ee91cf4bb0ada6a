"""Atomic writes: a crash in the middle of writing metrics.json or an adapter folder leaves the previous one intact."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from npft_lightning.core.io import atomic_dir, atomic_file, atomic_write_json
from npft_lightning.training.run_artifacts import RunArtifacts


class Crash(Exception):
    pass


def half_then_crash(self: Path, text: str, *args, **kwargs):
    """Stands in for ``Path.write_text``: half of the bytes reach the disk, then the process "dies"."""
    with open(self, "w", encoding="utf-8") as f:
        f.write(text[: len(text) // 2])
    raise Crash("killed mid-write")


def test_crash_mid_write_leaves_the_previous_metrics_json(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    atomic_write_json(path, {"ppl": {"after": {"rtn4": 12.5}}, "run": 1})
    before = path.read_bytes()
    monkeypatch.setattr(Path, "write_text", half_then_crash)
    with pytest.raises(Crash):
        atomic_write_json(path, {"ppl": {"after": {"rtn4": 11.0}}, "run": 2, "padding": "x" * 10_000})
    assert path.read_bytes() == before
    assert json.loads(before)["run"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left behind


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "plot.png"
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"first")
    with pytest.raises(Crash), atomic_file(path) as tmp:
        tmp.write_bytes(b"sec")
        raise Crash
    assert path.read_bytes() == b"first"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


class FakeModel:
    """Writes an adapter folder like PEFT's ``save_pretrained``, optionally dying after the first file."""

    def __init__(self, version: int, crash: bool = False):
        self.version, self.crash = version, crash

    def save_pretrained(self, folder: str) -> None:
        Path(folder, "adapter_config.json").write_text(json.dumps({"version": self.version}))
        if self.crash:
            raise Crash("killed while writing the weights")
        Path(folder, "adapter_model.safetensors").write_bytes(bytes([self.version]) * 100)


def test_crash_while_saving_the_adapter_keeps_the_previous_adapter_and_metrics(tmp_path):
    trainer = types.SimpleNamespace(is_global_zero=True, callbacks=[], callback_metrics={}, global_step=3, current_epoch=0,
                                    world_size=1)
    artifacts = RunArtifacts(tmp_path, config={"seed": 0})
    artifacts.on_fit_end(trainer, types.SimpleNamespace(model=FakeModel(1)))
    adapter = tmp_path / "adapter"
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    metrics = (tmp_path / "metrics.json").read_bytes()

    with pytest.raises(Crash):
        artifacts.on_fit_end(trainer, types.SimpleNamespace(model=FakeModel(2, crash=True)))
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == files
    assert (tmp_path / "metrics.json").read_bytes() == metrics  # the adapter is written first: no new metrics either
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.json"]

    with atomic_dir(adapter) as tmp:  # and a good write does replace it
        FakeModel(3).save_pretrained(str(tmp))
    assert json.loads((adapter / "adapter_config.json").read_text()) == {"version": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "metrics.json"]
