"""Runtime guards: NaN losses skip the update and stop the run after N in a row; NaN quantized weights name their layer."""

from __future__ import annotations

import math
import types

import lightning.pytorch as pl
import pytest
import torch
from helpers import make_datamodule, make_module, snapshot
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from npft_lightning.core.errors import UserError
from npft_lightning.quant import RTN, fake_quantized
from npft_lightning.quant.base import NonFiniteQuantization, WeightQuantizer
from npft_lightning.training.callbacks import FakeQuantValidation
from npft_lightning.training.nonfinite import NonFiniteGuard


class PoisonLoss(Callback):
    """Test-only: the loss is NaN in the batches that start at the given global steps (the logits are multiplied by NaN)."""

    def __init__(self, steps):
        self.steps = set(steps)
        self.handle = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            head = pl_module.model.get_output_embeddings()
            self.handle = head.register_forward_hook(lambda module, inputs, output: output * float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class AdapterSpy(Callback):
    """The trainable (LoRA) weights after each optimizer step, by global step."""

    def __init__(self):
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}


def fit(poison, steps: int, max_consecutive: int = 5, **trainer_kw):
    module, dm = make_module(), make_datamodule()
    guard, spy = NonFiniteGuard(max_consecutive), AdapterSpy()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, gradient_clip_val=1.0,
        callbacks=[PoisonLoss(poison), guard, spy, *trainer_kw.pop("callbacks", [])], **trainer_kw,
    )
    return module, dm, guard, spy, trainer


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_steps_make_no_update_and_are_counted():
    module, dm, guard, spy, trainer = fit(poison=[1, 2], steps=5, enable_checkpointing=False)
    with pytest.warns(UserWarning, match="not finite; skipped the update"):
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 5
    assert guard.skipped == 2 and guard.consecutive == 0
    assert float(trainer.callback_metrics["train/skipped_nonfinite"]) == 2
    # Steps 2 and 3 (the batches starting at global steps 1 and 2) changed nothing; the others did.
    assert same(spy.after[2], spy.after[1]) and same(spy.after[3], spy.after[1])
    assert not same(spy.after[4], spy.after[3]) and not same(spy.after[1], spy.after[5])
    assert all(torch.isfinite(t).all() for t in spy.after[5].values())
    # AdamW made 3 updates, not 5: skipped steps leave its moments and step count alone.
    steps = {int(state["step"]) for state in trainer.optimizers[0].state.values()}
    assert steps == {3}


def test_too_many_in_a_row_stop_with_one_line_and_keep_the_checkpoint(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_last=True, save_top_k=0)
    module, dm, guard, spy, trainer = fit(poison=range(1, 100), steps=10, max_consecutive=3, callbacks=[checkpoints])
    with pytest.warns(UserWarning), pytest.raises(UserError) as err:
        trainer.fit(module, datamodule=dm)
    message = str(err.value)
    assert "\n" not in message
    assert "not finite for 3 steps in a row (steps 1-3, no update made)" in message
    assert str(tmp_path / "last.ckpt") in message
    # The checkpoint holds the weights of the last good step, finite.
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert state.keys() == spy.after[1].keys()
    assert all(torch.equal(state[k], spy.after[1][k]) for k in state)


def test_guard_state_survives_a_checkpoint():
    guard = NonFiniteGuard(4)
    guard.skipped, guard.consecutive = 7, 2
    other = NonFiniteGuard(4)
    other.load_state_dict(guard.state_dict())
    assert (other.skipped, other.consecutive) == (7, 2)
    with pytest.raises(UserError, match="max_nonfinite_steps=-1"):
        NonFiniteGuard(-1)


# ------------------------------------------------------------------------------------------ quantizers
class BreaksOneLayer(WeightQuantizer):
    """Test-only: RTN-4, but writes NaN into one named layer (as a degenerate scale would)."""

    name = "broken"

    def __init__(self, layer: str):
        self.layer = layer

    def quantize_weight(self, weight, *, name=None):
        out = RTN(4).quantize_weight(weight)
        if name == self.layer:
            out[0, :3] = float("nan")
        return out


def test_nonfinite_quantized_weights_name_the_layer():
    module = make_module()
    linears = module.decoder_linears()
    layer = sorted(linears)[3]
    before = snapshot(module)
    with pytest.raises(NonFiniteQuantization, match=rf"quantizer broken produced 3 non-finite weights .* in {layer};"):
        with fake_quantized(module.model, linears, BreaksOneLayer(layer)):
            pass
    assert same(before, snapshot(module))  # restored on the way out

    with torch.no_grad():
        linears[layer].weight[1, 1] = float("inf")
    with pytest.raises(NonFiniteQuantization, match=rf"{layer} holds 1 non-finite weights .* before quantizer rtn4 runs"):
        with fake_quantized(module.model, linears, RTN(4, name="rtn4")):
            pass


def test_fake_quant_validation_reports_a_broken_quantizer_and_goes_on():
    module, dm = make_module(), make_datamodule()
    layer = sorted(module.decoder_linears())[0]
    callback = FakeQuantValidation({"broken": BreaksOneLayer(layer), "rtn4": RTN(4, name="rtn4")})
    before = snapshot(module)
    with pytest.warns(UserWarning, match=f"non-finite weights .* in {layer}"):
        result = callback.quantized_ppl(types.SimpleNamespace(datamodule=dm), module)
    assert math.isnan(result["broken"]) and math.isfinite(result["rtn4"])
    assert layer in callback.errors["broken"]
    assert same(before, snapshot(module))
