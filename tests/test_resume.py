"""Checkpoints and exact resume through the real ``train.py``: SIGKILL a run, resume it, get the same adapter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from npft_lightning.callbacks import AtomicCheckpointIO
from npft_lightning.export import adapter_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A tiny model, 10 training windows = 5 batches per epoch, 6 steps: the run crosses an epoch boundary
# (with its validation) and the kill at step 4 falls mid-epoch. LoRA dropout (0.05) and per-step noise
# are on, so the RNG and the data order both have to be restored for the weights to match.
TINY = ["model=tiny-llama", "data.seq_len=64", "data.eval_seq_len=128", "data.max_eval_windows=1",
        "data.max_train_windows=10", "outliers.calibration_windows=2", "outliers.calibration_length=64",
        "curvature=null", "quant=[rtn4]", "callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false",
        "trainer.max_epochs=2", "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.model_checkpoint.save_top_k=-1"]


class KillAt(Callback):
    """Test-only: SIGKILL this process as step ``step`` + 1 begins, i.e. right after step ``step``'s checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_train(run_dir: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYDRA_FULL_ERROR", None)
    cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=timeout)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = run_train(full)
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = run_train(killed, "+callbacks.kill._target_=test_resume.KillAt", "+callbacks.kill.step=4")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"], ckpts  # no temp file left behind
    assert not (killed / "metrics.json").exists()

    proc = run_train(killed, f"ckpt_path={killed / 'checkpoints' / 'step_000004.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    expected, resumed = adapter_weights(full), adapter_weights(killed)
    assert expected.keys() == resumed.keys() and expected
    for name in expected:
        assert torch.allclose(resumed[name], expected[name], atol=1e-6, rtol=0), name
    # The run trained: the adapters moved away from LoRA's B = 0 start.
    assert any(float(t.abs().max()) > 0 for name, t in expected.items() if "lora_B" in name)

    # Any checkpoint exports to an adapter folder: the last one (step 6) is the run's adapter/, an earlier
    # one holds exactly the checkpoint's adapter tensors.
    exported = adapter_from_checkpoint(full / "checkpoints" / "last.ckpt")
    assert exported == full / "checkpoints" / "last_adapter"
    weights = load_file(exported / "adapter_model.safetensors")
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
    step2 = killed / "checkpoints" / "step_000002.ckpt"
    earlier = load_file(adapter_from_checkpoint(step2) / "adapter_model.safetensors")
    state = torch.load(step2, weights_only=True)["state_dict"]
    assert len(state) == len(earlier)  # the checkpoint holds the adapters only, no frozen base weights
    for name, tensor in earlier.items():
        assert torch.equal(tensor, state["model." + name.replace(".weight", ".default.weight")]), name
    assert not all(torch.equal(earlier[k], expected[k]) for k in expected)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("killed mid-write")


def test_checkpoint_write_is_atomic(tmp_path):
    """A write that dies half-way leaves the previous checkpoint intact and no temporary file behind."""
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    before = path.read_bytes()
    try:
        io.save_checkpoint({"step": 2, "w": torch.zeros(1000), "bad": Unpicklable()}, path)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failing write did not raise")
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]
    assert io.load_checkpoint(path)["step"] == 1
