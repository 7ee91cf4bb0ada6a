"""DDP through Lightning's strategies: two CPU ranks (gloo, ddp_spawn) through the real ``train.py -m``.

The ranks must select the same outliers and add the same noise, each validation PPL must count
every window exactly once (3 windows on 2 ranks: a padded or duplicated window would show), and
the files must come from the spawned workers that hold the trained weights.
"""

from __future__ import annotations

import csv
import json
import math
import types
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import QUIET_TRAIN, TINY_TRAIN, fill_lora_b, make_tiny_llama, run_sweep
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf
from peft import LoraConfig, set_peft_model_state_dict
from safetensors.torch import load_file

from npft_lightning.core import masks as mask_ops
from npft_lightning.quant import RTN
from npft_lightning.tasks.build import build_quantizers
from npft_lightning.training.callbacks import FakeQuantValidation
from npft_lightning.training.module import NPFTModule

# 8 training windows = 2 batches of 2 per rank, so the 2 steps end the epoch and its validation loop
# (the SumMetric path) runs; 3 validation windows do not split evenly over 2 ranks.
# NPFT as first built (sparse Fisher masks, noise every step): the masks and the noise must agree across ranks.
TINY = ["experiment=npft_fisher", *TINY_TRAIN, *QUIET_TRAIN, "data.max_eval_windows=3", "data.max_train_windows=8",
        "trainer.max_steps=2"]


class RankProbe(Callback):
    """Test-only: each rank saves its outlier masks, the batch, the noise it added and its merged weights W + ΔW
    at optimizer step ``step``."""

    def __init__(self, out_dir: str, step: int = 0):
        self.out_dir = Path(out_dir)
        self.step = step
        self.clean: dict[str, torch.Tensor] = {}

    @staticmethod
    def _outlier_values(pl_module: NPFTModule) -> dict[str, torch.Tensor]:
        linears = pl_module.decoder_linears()
        return {n: linears[n].weight.detach().reshape(-1)[mask_ops.index(m)].clone() for n, m in pl_module.outlier_masks.items()}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: NPFTModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:  # runs before the noise callback perturbs the weights
            self.clean = self._outlier_values(pl_module)
            self.batch = batch.cpu()
            deltas = pl_module.lora_deltas()
            self.deltas = {n: deltas[n].cpu() for n in deltas}
            self.merged = {n: lin.weight.detach().float().cpu() + self.deltas[n] for n, lin in pl_module.decoder_linears().items()
                           if n in deltas}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: NPFTModule, optimizer) -> None:
        if trainer.global_step == self.step:  # the step's noise is still in the weights
            noisy = self._outlier_values(pl_module)
            torch.save({"masks": {k: mask_ops.index(v, "cpu") for k, v in pl_module.outlier_masks.items()},
                        "noise": {k: noisy[k] - self.clean[k] for k in noisy}, "batch": self.batch, "merged": self.merged,
                        "deltas": self.deltas,
                        "world_size": trainer.world_size}, self.out_dir / f"rank{trainer.global_rank}.pt")


def single_process_ppl(config: dict, adapter_dir: Path | None) -> dict[str, float]:
    """The run's validation PPLs recomputed in this process, on all windows at once (no DDP)."""
    cfg = OmegaConf.create(config)
    model, tokenizer = instantiate(cfg.model).load()
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("validate")
    assert datamodule.eval_windows().size(0) == 3
    lora = LoraConfig.from_pretrained(str(adapter_dir)) if adapter_dir else LoraConfig(target_modules=["q_proj", "v_proj"])
    module = NPFTModule(model, lora)
    if adapter_dir is not None:
        set_peft_model_state_dict(module.model, load_file(adapter_dir / "adapter_model.safetensors"))
    trainer = types.SimpleNamespace(datamodule=datamodule)
    return FakeQuantValidation(build_quantizers(cfg))._evaluate_all(trainer, module)


@pytest.mark.slow
def test_two_cpu_ranks_agree_and_match_a_single_process(tmp_path):
    proc = run_sweep(tmp_path / "sweep", *TINY, "trainer=ddp_cpu", "+callbacks.probe._target_=test_ddp.RankProbe",
                     f"+callbacks.probe.out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = tmp_path / "sweep" / "0"
    metrics = json.loads((job / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == 2 and metrics["train"]["global_step"] == 2
    assert "Validation perplexity" in proc.stdout  # the launching process printed what the workers wrote

    # Both ranks: the same outliers and the same noise on them, but different training windows.
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    assert all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    assert all(torch.equal(r0["noise"][k], r1["noise"][k]) for k in r0["noise"])
    assert any(float(v.abs().max()) > 0 for v in r0["noise"].values())
    assert not torch.equal(r0["batch"], r1["batch"])

    # PPL before (base model) and after (the adapter rank 0 saved) equal one process over the 3 windows.
    before = single_process_ppl(metrics["config"], None)
    after = single_process_ppl(metrics["config"], job / "adapter")
    assert before.keys() == after.keys() == {"fp", "rtn4"}
    for name in before:
        assert metrics["ppl"]["before"][name] == pytest.approx(before[name], rel=1e-6)
        assert metrics["ppl"]["after"][name] == pytest.approx(after[name], rel=1e-6)
    assert after["fp"] != before["fp"]


@pytest.mark.slow
def test_two_cpu_ranks_draw_identical_quant_error_noise_at_a_later_step(tmp_path):
    """The exact-error noise with Quant-Noise probability on bitmap masks (10 %), at step 2 (in the second epoch), when
    the adapters have trained (ΔW ≠ 0): every rank holds the same merged weights and perturbs identically, by the
    RTN-4 error of that merged weight."""
    later = [o for o in TINY if not o.startswith("trainer.max_steps=")] + ["trainer.max_steps=3", "trainer.max_epochs=2"]
    # A large learning rate, so two steps move the adapters well away from B = 0.
    proc = run_sweep(tmp_path / "sweep", *later, "trainer=ddp_cpu", "noise=quant_error", "noise.distribution.probability=0.5",
                     "outliers.ratio=10", "optimizer.lr=1e-2", "+callbacks.probe._target_=test_ddp.RankProbe",
                     f"+callbacks.probe.out_dir={tmp_path}", "+callbacks.probe.step=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert r0["masks"] and all(torch.equal(r0["masks"][k], r1["masks"][k]) for k in r0["masks"])
    assert r0["merged"].keys() == r1["merged"].keys() and r0["merged"]
    assert all(torch.equal(r0["merged"][k], r1["merged"][k]) for k in r0["merged"])
    assert all(torch.equal(r0["noise"][k], r1["noise"][k]) for k in r0["noise"])
    assert not torch.equal(r0["batch"], r1["batch"])

    assert any(float(d.abs().max()) > 1e-3 for d in r0["deltas"].values())  # ΔW ≠ 0
    moved = selected = 0
    for name, noise in r0["noise"].items():
        kept = noise != 0
        merged = r0["merged"][name]
        error = (RTN(4).quantize_weight(merged) - merged).reshape(-1)[r0["masks"][name].long()]
        torch.testing.assert_close(noise[kept], error[kept], rtol=0, atol=1e-6)  # Q(W + ΔW) − (W + ΔW), not Q(W) − W
        moved, selected = moved + int(kept.sum()), selected + noise.numel()
    assert 0.3 * selected < moved < 0.6 * selected  # about half of the selected weights take their error


class StepProbe(Callback):
    """Test-only: each rank saves, per optimizer step, the grid its noise drew (None on a clean step) and the noise it
    added to every decoder weight."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.steps: dict[int, dict] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: NPFTModule, batch, batch_idx: int) -> None:
        # runs before the noise callback (the config's callbacks come first): the clean weights
        self.clean = {n: lin.weight.detach().clone() for n, lin in pl_module.decoder_linears().items()}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: NPFTModule, optimizer) -> None:
        noise = trainer.callbacks[[type(c).__name__ for c in trainer.callbacks].index("NoisePerturbation")]
        added = {n: lin.weight.detach() - self.clean[n] for n, lin in pl_module.decoder_linears().items()}
        perturbed = any(bool(d.any()) for d in added.values())
        self.steps[trainer.global_step] = {"grid": noise.distribution.grid if perturbed else None, "noise": added}

    def on_train_end(self, trainer: pl.Trainer, pl_module: NPFTModule) -> None:
        torch.save(self.steps, self.out_dir / f"steps{trainer.global_rank}.pt")


@pytest.mark.slow
def test_two_cpu_ranks_distil_on_the_same_steps_and_grids(tmp_path):
    """experiment=mixed_multi (five grids) with a self-distilling teacher and the quantized steps in the last 2/3 of a
    3-step run (steps 1 and 2): both ranks perturb the same steps with the same grid and the same noise, the perturbed
    steps log their KL and grid, the clean step neither."""
    overrides = [o for o in TINY if not o.startswith(("experiment=", "quant=", "trainer.max_steps="))]
    proc = run_sweep(tmp_path / "sweep", *overrides, "trainer=ddp_cpu", "experiment=mixed_multi", "noise.step_probability=1.0",
                     "noise.placement=last", "noise.last_fraction=0.67", "noise.distill.teacher=self",
                     "noise.distill.weight=0.5", "trainer.max_steps=3", "trainer.max_epochs=2",
                     "+callbacks.probe._target_=test_ddp.StepProbe", f"+callbacks.probe.out_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"steps{r}.pt") for r in (0, 1))
    assert sorted(r0) == sorted(r1) == [0, 1, 2]
    assert r0[0]["grid"] is None and r0[1]["grid"] is not None and r0[2]["grid"] is not None
    for step in r0:
        assert r0[step]["grid"] == r1[step]["grid"]
        assert all(torch.equal(r0[step]["noise"][n], r1[step]["noise"][n]) for n in r0[step]["noise"])
    with open(tmp_path / "sweep" / "0" / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kl = {int(r["step"]): float(r["train/kl"]) for r in rows if r.get("train/kl")}
    grid = {int(r["step"]): int(float(r["noise/grid"])) for r in rows if r.get("noise/grid")}
    assert sorted(kl) == [1, 2] and all(math.isfinite(v) and v > 0 for v in kl.values())
    assert grid == {1: r0[1]["grid"], 2: r0[2]["grid"]}


def test_gradient_checkpointing_gives_the_same_gradients():
    """``gradient_checkpointing=true`` trades compute for memory; the LoRA gradients must not change."""
    batch = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA init in both modules
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
        module = fill_lora_b(NPFTModule(make_tiny_llama(), lora, gradient_checkpointing=checkpointing))
        module.model.train()
        assert module.model.base_model.model.model.gradient_checkpointing == checkpointing
        module.model(input_ids=batch, labels=batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name
