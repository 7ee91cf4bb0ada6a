"""The noise recipes inside a real Lightning fit: what the forward pass sees at each step.

A tiny LLaMA with non-zero LoRA B (so ΔW = s·B·A matters), the real ``OutlierSelection`` and
``NoisePerturbation`` callbacks, and forward pre-hooks on the base linears that record the weight
each forward pass actually reads. With ``step_probability`` 0.15 (the default recipe) and seed 26,
steps 0 and 2 are perturbed and steps 1 and 3 clean, so clean steps follow perturbed ones.

At a perturbed step the training loss must equal that of a plain model holding the merged weight
W + ΔW with the selected entries moved by the step's draw (for ``quant_error``: Q(W + ΔW), computed
here from the quantizer directly); at a clean step the forward reads W bit for bit; ``noise/scale``
logs 0 on clean steps; after every step the base weights are bit-identical to before the fit.
Validation inside the epoch reads the clean weights and training goes on with the right draw; a fit resumed
from a checkpoint draws at each step what the uninterrupted fit drew; an exception inside a perturbed step leaves
the base weights clean.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from helpers import (
    PERTURBED,
    SEED,
    STEP_PROBABILITY,
    STEPS,
    TARGETS,
    ForwardProbe,
    StepLogger,
    fill_lora_b,
    make_datamodule,
    make_module,
    make_tiny_llama,
    make_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from peft import LoraConfig

from npft_lightning.core import masks as mask_ops
from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.noise import (
    GaussianNoise,
    NPFTPaperNoise,
    QuantErrorNoise,
    UniformStepNoise,
    apply_noise,
    noise_generator,
)
from npft_lightning.npft.outliers import OutlierSelector
from npft_lightning.quant import RTN
from npft_lightning.training.callbacks import NoisePerturbation, OutlierSelection
from npft_lightning.training.module import NPFTModule


def merged_loss(weights: dict[str, torch.Tensor], batch: torch.Tensor) -> float:
    """The loss of a plain tiny LLaMA (the module's base, no adapters) whose decoder linears hold ``weights``."""
    model = make_tiny_llama()
    with torch.no_grad():
        for name, linear in decoder_linears(model).items():
            linear.weight.copy_(weights[name])
        return float(model(input_ids=batch, labels=batch).loss)


KINDS = {
    "quant_error": lambda: QuantErrorNoise(RTN(4)),
    "uniform_step": lambda: UniformStepNoise(bits=4),
    "gaussian": lambda: GaussianNoise(scale=0.1),
    "npft_paper": lambda: NPFTPaperNoise(),
}
SELECTORS = {  # outliers=all, a sparse index mask, a dense (bitmap) one
    "all": (lambda: OutlierSelector(method="all"), mask_ops.AllEntries),
    "index": (lambda: OutlierSelector(method="magnitude", ratio=0.5), torch.Tensor),
    "bitmap": (lambda: OutlierSelector(method="magnitude", ratio=10.0), mask_ops.BitMask),
}


def fit_recipe(kind: str, selection: str, schedule: str = "per_step", step_probability: float = STEP_PROBABILITY, **trainer_kw):
    module, dm = make_module(), make_datamodule()
    clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    noise = NoisePerturbation(KINDS[kind](), schedule=schedule, seed=SEED, step_probability=step_probability)
    probe, logger = ForwardProbe(), StepLogger()
    trainer = make_trainer([OutlierSelection(SELECTORS[selection][0]()), noise, probe], logger=logger, **trainer_kw)
    trainer.fit(module, datamodule=dm)
    return module, clean, noise, probe, logger


@pytest.mark.parametrize("selection", SELECTORS)
@pytest.mark.parametrize("kind", KINDS)
def test_each_step_sees_its_draw_or_the_clean_weights_and_ends_clean(kind, selection):
    module, clean, noise, probe, logger = fit_recipe(kind, selection)
    masks = module.outlier_masks
    assert masks and all(isinstance(m, SELECTORS[selection][1]) for m in masks.values())
    assert {s for s in range(STEPS) if noise._step_is_perturbed(0, s)} == PERTURBED
    assert sorted(probe.seen) == list(range(STEPS)) and all(probe.seen[s].keys() == clean.keys() for s in probe.seen)
    assert any(float(d.abs().max()) > 0 for d in probe.deltas[0].values())  # ΔW ≠ 0 from the first step on

    for step in range(STEPS):
        seen, deltas = probe.seen[step], probe.deltas[step]
        scale = noise.base_scale if step in PERTURBED else 0.0
        assert logger.rows[step]["noise/scale"] == pytest.approx(scale, rel=1e-7, abs=0)
        # after the step, clean again bit for bit
        assert all(torch.equal(probe.after[step][n], clean[n]) for n in clean), f"step {step} left noise behind"
        if step not in PERTURBED:
            assert all(torch.equal(seen[n], clean[n]) for n in clean), f"clean step {step} saw noise"
            expected = {n: clean[n] + deltas[n] for n in clean}
        else:
            merged = {n: clean[n] + deltas[n] for n in clean}
            if kind == "quant_error":
                # The forward's effective weight: Q(W + ΔW) at the selected entries, W + ΔW elsewhere.
                expected = {}
                for name, w in merged.items():
                    idx = mask_ops.explicit_index(masks[name], w)
                    target = w.reshape(-1).clone()
                    target[idx] = RTN(4).quantize_weight(w).reshape(-1)[idx]
                    expected[name] = target.reshape(w.shape)
                for name in clean:
                    torch.testing.assert_close(seen[name] + deltas[name], expected[name], rtol=0, atol=1e-6)
            else:
                # The step's own draw, redrawn here from (seed, epoch 0, step) on a copy of the clean weights.
                copies = {n: types.SimpleNamespace(weight=w.clone()) for n, w in clean.items()}
                apply_noise(copies, masks, copy.deepcopy(noise.distribution), noise_generator(SEED, 0, step))
                for name in clean:
                    assert torch.equal(seen[name], copies[name].weight), f"step {step}: {name} is not the step's draw"
                expected = {n: seen[n] + deltas[n] for n in clean}
            # the draw moved the selected entries, and only those
            moved = 0
            for name, w in seen.items():
                changed = (w != clean[name]).reshape(-1)
                outside = torch.ones_like(changed)
                outside[mask_ops.explicit_index(masks[name], w)] = False
                assert not changed[outside].any(), f"step {step}: {name} moved outside its mask"
                moved += int(changed.sum())
            assert moved > 0
        # and the training loss is that of a plain model holding the effective merged weight
        assert probe.loss[step] == pytest.approx(merged_loss(expected, probe.batch[step]), rel=1e-5, abs=0)


@pytest.mark.parametrize("schedule", ["per_step", "per_epoch"])
def test_validation_inside_training_sees_clean_weights_and_training_resumes_with_its_noise(schedule):
    """Validation after steps 2 and 4 (``val_check_interval=2``) reads the clean weights; the steps after it see their
    own draw (per step) or the epoch's draw again (per epoch, re-applied after validation)."""
    steps = 5
    module, clean, noise, probe, _ = fit_recipe("uniform_step", "index", schedule=schedule, step_probability=1.0, steps=steps,
                                                val_check_interval=2, limit_val_batches=1)
    assert len(probe.validation_seen) == 2  # two validations inside the epoch, one batch each
    for seen in probe.validation_seen:
        assert seen.keys() == clean.keys() and all(torch.equal(seen[n], clean[n]) for n in clean), "validation saw noise"
    assert sorted(probe.seen) == list(range(steps))
    for step in range(steps):
        copies = {n: types.SimpleNamespace(weight=w.clone()) for n, w in clean.items()}
        draw = noise_generator(SEED, 0, step if schedule == "per_step" else -1)
        apply_noise(copies, module.outlier_masks, copy.deepcopy(noise.distribution), draw)
        assert any(not torch.equal(copies[n].weight, clean[n]) for n in clean)
        assert all(torch.equal(probe.seen[step][n], copies[n].weight) for n in clean), f"step {step} did not see its draw"
        held = probe.after[step] if schedule == "per_epoch" else clean  # the epoch's draw stays between steps
        assert all(torch.equal(probe.after[step][n], held[n]) for n in clean)
    # the fit ends with the clean weights in place
    assert all(torch.equal(lin.weight, clean[n]) for n, lin in module.decoder_linears().items())


def test_a_resumed_fit_draws_at_each_step_what_the_uninterrupted_fit_drew(tmp_path):
    """Resumed from the checkpoint the uninterrupted fit wrote after step 1: steps 1 (clean), 2 (perturbed) and 3
    (clean) see exactly the weights the uninterrupted fit's steps saw, and log the same noise/scale: the draw follows
    the global step, not the steps this process has run (counted from the resume, step 1 would be drawn as step 0,
    which is perturbed)."""
    def fit(*extra, ckpt_path=None) -> tuple[ForwardProbe, StepLogger, dict[str, torch.Tensor]]:
        module, probe, logger = make_module(), ForwardProbe(), StepLogger()
        clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
        noise = NoisePerturbation(KINDS["uniform_step"](), seed=SEED, step_probability=STEP_PROBABILITY)
        trainer = make_trainer([OutlierSelection(SELECTORS["index"][0]()), noise, probe, *extra], logger=logger,
                               enable_checkpointing=bool(extra))
        trainer.fit(module, datamodule=make_datamodule(), ckpt_path=ckpt_path)
        return probe, logger, clean

    every_two = ModelCheckpoint(dirpath=tmp_path, filename="step{step}", every_n_train_steps=1, save_top_k=-1,
                                auto_insert_metric_name=False)
    full, full_log, clean = fit(every_two)
    probe, logger, _ = fit(ckpt_path=tmp_path / "step1.ckpt")

    assert sorted(probe.seen) == [1, 2, 3]
    for step in (1, 2, 3):
        assert logger.rows[step]["noise/scale"] == full_log.rows[step]["noise/scale"]
        assert all(torch.equal(probe.seen[step][n], full.seen[step][n]) for n in clean), f"resumed step {step} drew another draw"
    assert any(not torch.equal(probe.seen[2][n], clean[n]) for n in clean)
    assert all(torch.equal(probe.seen[step][n], clean[n]) for step in (1, 3) for n in clean)


class FailAt(Callback):
    """Test-only: raise inside the training step ``step`` (before its backward), noting whether the weights were perturbed."""

    def __init__(self, step: int, clean: dict[str, torch.Tensor]):
        self.step, self.clean = step, clean
        self.perturbed_when_raised: bool | None = None

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step:
            linears = pl_module.decoder_linears()
            self.perturbed_when_raised = any(not torch.equal(linears[n].weight, w) for n, w in self.clean.items())
            raise RuntimeError("test failure inside a perturbed step")


@pytest.mark.parametrize("kind, schedule, step_probability", [("quant_error", "per_step", STEP_PROBABILITY),
                                                              ("uniform_step", "per_epoch", 1.0)])
def test_an_exception_inside_a_perturbed_step_leaves_the_base_weights_clean(kind, schedule, step_probability):
    module, dm = make_module(), make_datamodule()
    clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    noise = NoisePerturbation(KINDS[kind](), schedule=schedule, seed=SEED, step_probability=step_probability)
    fail = FailAt(2, clean)  # step 2 is perturbed (PERTURBED)
    trainer = make_trainer([OutlierSelection(SELECTORS["all"][0]()), noise, fail])
    with pytest.raises(RuntimeError, match="test failure inside a perturbed step"):
        trainer.fit(module, datamodule=dm)
    assert fail.perturbed_when_raised is True
    assert all(torch.equal(lin.weight, clean[n]) for n, lin in module.decoder_linears().items())


def test_bf16_weights_take_the_documented_exact_error_and_come_back_bit_exactly():
    """bf16 base weights (``model.dtype=bfloat16``) under the default recipe: at a perturbed step each weight is
    W + δ rounded once to bf16, with δ = Q(W') − W' and W' = W + ΔW in float32 (``apply_noise`` / ``QuantErrorNoise``);
    a clean step reads W, and after every step W is back bit for bit."""
    module = NPFTModule(make_tiny_llama().to(torch.bfloat16), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))
    fill_lora_b(module)
    clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    assert all(w.dtype == torch.bfloat16 for w in clean.values())
    noise = NoisePerturbation(QuantErrorNoise(RTN(4)), seed=SEED, step_probability=STEP_PROBABILITY)
    probe = ForwardProbe()
    make_trainer([OutlierSelection(OutlierSelector(method="all")), noise, probe]).fit(module, datamodule=make_datamodule())

    assert sorted(probe.seen) == list(range(STEPS))
    for step in range(STEPS):
        assert all(torch.equal(probe.after[step][n], clean[n]) for n in clean), f"step {step} left noise behind"
        seen = probe.seen[step]
        if step not in PERTURBED:
            assert all(torch.equal(seen[n], clean[n]) for n in clean), f"clean step {step} saw noise"
            continue
        changed = 0
        for name, w in clean.items():
            merged = w.float() + probe.deltas[step][name].float()
            error = RTN(4).quantize_weight(merged) - merged
            expected = (w.float() + error).to(torch.bfloat16)
            assert seen[name].dtype == torch.bfloat16 and torch.equal(seen[name], expected), f"step {step}: {name}"
            changed += int((seen[name] != w).sum())
        assert changed > 0
