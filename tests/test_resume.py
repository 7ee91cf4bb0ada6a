"""Checkpoints and exact resume through the real ``train.py``: SIGKILL or Ctrl-C a run, resume it, get the same adapter and one log."""

from __future__ import annotations

import csv
import os
import shlex
import signal
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET_TRAIN, ROOT, TINY_TRAIN, run_python
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from npft_lightning.tasks.export import adapter_from_checkpoint
from npft_lightning.training.run_artifacts import AtomicCheckpointIO

# A tiny model, 10 training windows = 5 batches per epoch, 6 steps: the run crosses an epoch boundary
# (with its validation) and the kill at step 4 falls mid-epoch. LoRA dropout (0.05) and per-step noise
# are on, so the RNG and the data order both have to be restored for the weights to match.
# The default recipe perturbs 15 % of the steps; seed 197 makes it perturb steps 0, 2 and 5 (clean 1, 3, 4), so the
# steps replayed after the checkpoint at step 4 are a clean one and a perturbed one in the next epoch, and a
# resume that restarted its step count would draw the other pattern (step 0 perturbed, epoch 1's step 1 clean).
SEED = 197
TINY = [*TINY_TRAIN, *QUIET_TRAIN, "data.max_eval_windows=1", "data.max_train_windows=10", "trainer.max_epochs=2",
        "trainer.max_steps=6", "callbacks.model_checkpoint.every_n_train_steps=2", "callbacks.model_checkpoint.save_top_k=-1",
        f"seed={SEED}"]
RESUMED_AT = 4  # the checkpoint both interrupted runs resume from
# The recipes resumed: the default (exact RTN-4 error of every merged weight on 15 % of the steps) and per-step
# random noise (uniform step noise on 0.5 % Fisher outliers, every step a fresh draw).
RECIPES = {"default": [], "per_step_noise": ["experiment=npft_fisher"]}


class KillAt(Callback):
    """Test-only: SIGKILL this process as step ``step`` + 1 begins, i.e. right after step ``step``'s checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class CtrlCAt(Callback):
    """Test-only: send this process SIGINT (what Ctrl-C does) as the batch of global step ``step`` begins."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def run_train(run_dir: Path, *overrides: str):
    return run_python([str(ROOT / "train.py"), f"hydra.run.dir={run_dir}", *TINY, *overrides], run_dir.parent)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapter(run_dir: Path, reference: Path) -> None:
    expected, resumed = adapter_weights(reference), adapter_weights(run_dir)
    assert expected.keys() == resumed.keys() and expected
    for name in expected:
        assert torch.allclose(resumed[name], expected[name], atol=1e-6, rtol=0), name
    # The run trained: the adapters moved away from LoRA's B = 0 start.
    assert any(float(t.abs().max()) > 0 for name, t in expected.items() if "lora_B" in name)


def logged(run_dir: Path, column: str) -> list[tuple[int, str]]:
    """(step, value) of every row of ``<run>/csv/metrics.csv`` that has ``column``."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [(int(row["step"]), row[column]) for row in csv.DictReader(f) if row.get(column)]


def replayed_noise(run_dir: Path) -> list[tuple[int, float]]:
    """(step, noise/scale) of the steps after the checkpoint the interrupted runs resume from."""
    return [(step, float(value)) for step, value in logged(run_dir, "noise/scale") if step >= RESUMED_AT]


@pytest.fixture(scope="module", params=[pytest.param("default", marks=pytest.mark.slow), pytest.param("per_step_noise", marks=pytest.mark.slow)])
def recipe(request) -> list[str]:
    """The overrides of the recipe under test."""
    return RECIPES[request.param]


@pytest.fixture(scope="module")
def full_run(recipe, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with; its replayed steps include a perturbed one."""
    full = tmp_path_factory.mktemp("resume") / "full"
    full.mkdir()
    proc = run_train(full, *recipe)
    assert proc.returncode == 0, proc.stderr[-3000:]
    replayed = replayed_noise(full)
    assert [step for step, _ in replayed] == [4, 5] and any(scale > 0 for _, scale in replayed), replayed
    if recipe == RECIPES["default"]:
        assert [scale > 0 for _, scale in replayed] == [False, True]
    return full


def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path, recipe, full_run):
    full, killed = full_run, tmp_path / "killed"
    proc = run_train(killed, *recipe, "+callbacks.kill._target_=test_resume.KillAt", f"+callbacks.kill.step={RESUMED_AT}")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step_000002.ckpt", "step_000004.ckpt"], ckpts  # no temp file left behind
    assert not (killed / "metrics.json").exists()

    proc = run_train(killed, *recipe, f"ckpt_path={killed / 'checkpoints' / 'step_000004.ckpt'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert replayed_noise(killed) == replayed_noise(full)  # the replayed steps drew what the uninterrupted run drew
    assert_same_adapter(killed, full)
    expected = adapter_weights(full)

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


def test_ctrl_c_saves_a_checkpoint_and_the_printed_command_resumes_it(tmp_path, recipe, full_run):
    """SIGINT mid-epoch: the step finishes, last.ckpt is written, one line gives the command; running it
    finishes the run with the uninterrupted run's adapter, and the CSV log continues without gaps or repeats."""
    stopped = tmp_path / "stopped"
    proc = run_train(stopped, *recipe, "+callbacks.ctrl_c._target_=test_resume.CtrlCAt", f"+callbacks.ctrl_c.step={RESUMED_AT - 1}")
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("interrupted")]
    assert len(lines) == 1, proc.stderr[-3000:]
    checkpoint = stopped / "checkpoints" / "last.ckpt"
    assert lines[0].startswith(f"interrupted by Ctrl-C after step 4; checkpoint saved to {checkpoint}; resume with: python ")
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 4
    assert not (stopped / "metrics.json").exists()  # an interrupted run is not a finished one
    assert [step for step, _ in logged(stopped, "train/loss")] == [0, 1, 2, 3]  # flushed on the way out

    command = shlex.split(lines[0].split("resume with: ", 1)[1])
    assert command[-2:] == [f"ckpt_path={checkpoint}", f"hydra.run.dir={stopped}"]
    proc = run_python(command[1:], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert logged(stopped, "noise/scale") == logged(full_run, "noise/scale")  # perturbed and clean at the same steps
    assert_same_adapter(stopped, full_run)
    # One log, continued: the same (step, loss) rows as the uninterrupted run, each step once.
    assert logged(stopped, "train/loss") == logged(full_run, "train/loss")
    assert [p.name for p in (stopped / "csv").iterdir()] == ["metrics.csv"]


def test_resumed_csv_log_keeps_the_rows_before_the_checkpoint(tmp_path):
    """Rows the interrupted run logged after its checkpoint are dropped; the resumed run logs them again."""
    from npft_lightning.training.loggers import ResumableCSVLogger

    first = ResumableCSVLogger(tmp_path, name="csv", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()

    resumed = ResumableCSVLogger(tmp_path, name="csv", version="")
    resumed.experiment.resume_at(4)  # the checkpoint was at global step 4
    resumed.log_metrics({"train/loss": 40.0, "val/ppl": 9.0}, step=4)
    resumed.save()
    rows = logged(tmp_path, "train/loss")
    assert rows == [(0, "0.0"), (1, "1.0"), (2, "2.0"), (3, "3.0"), (4, "40.0")]
    assert logged(tmp_path, "val/ppl") == [(4, "9.0")]


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


def test_a_run_written_before_the_layering_still_exports(tmp_path, full_run):
    """A run folder of the flat package (``_target_: npft_lightning.noise.QuantErrorNoise`` ...) exports its checkpoint."""
    from npft_lightning.tasks.legacy import LEGACY_TARGETS

    text = (full_run / ".hydra" / "config.yaml").read_text()
    for old, new in LEGACY_TARGETS.items():
        text = text.replace(f"_target_: {new}\n", f"_target_: {old}\n")
    assert "npft_lightning.lm." not in text and "npft_lightning.models.CausalLMSpec" in text
    old_config = tmp_path / "config.yaml"
    old_config.write_text(text)
    proc = run_python(["-m", "npft_lightning", "export", str(full_run / "checkpoints" / "last.ckpt"),
                       "--config", str(old_config), "--out", str(tmp_path / "adapter")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = Path(proc.stdout.strip().splitlines()[-1])
    weights, expected = load_file(exported / "adapter_model.safetensors"), adapter_weights(full_run)
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in expected)
