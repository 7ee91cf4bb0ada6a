"""Distillation on the perturbed steps (``noise.distill``) inside a real Lightning fit on a tiny LLaMA.

The default recipe's draw (``step_probability`` 0.15, seed 26) perturbs steps 0 and 2 of 4. At a perturbed step the
loss must be (1 − w)·CE + w·T²·KL(teacher ‖ student), the teacher's logits coming from a separate clean forward pass
(``self``: the merged weight W + ΔW; ``frozen``: the base model W) and the student's from the weights the step's
forward read; the teacher's forward runs without gradient on the clean weights (also for a later micro-batch of
an accumulated step, when the draw is already in place); the clean steps are those of a run without distillation,
bit for bit.
"""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
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
    make_datamodule,
    make_module,
    make_tiny_llama,
    make_trainer,
)
from peft import LoraConfig

from npft_lightning.core.layers import decoder_linears
from npft_lightning.npft.distill import Distillation, kl_to_teacher
from npft_lightning.npft.noise import QuantErrorNoise
from npft_lightning.npft.outliers import OutlierSelector
from npft_lightning.quant import RTN
from npft_lightning.training.callbacks import NoisePerturbation, OutlierSelection
from npft_lightning.training.module import NPFTModule


class TeacherStudentProbe(ForwardProbe):
    """Test-only: per optimizer step, the weights each forward pass of the base linears read, split into forward
    passes without gradient (the teacher's) and with it (the student's, one per micro-batch); the LoRA updates, the
    batch, the loss, and the distillation target the noise callback handed over. Place it after ``NoisePerturbation``."""

    def __init__(self):
        super().__init__()  # its hooks on every base linear call this class's _record
        self.teacher_seen: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.student_seen: dict[int, list[dict[str, torch.Tensor]]] = {}
        self.targets: dict[int, list] = {}

    def _record(self, trainer: pl.Trainer, name: str, module: torch.nn.Module, args) -> None:
        if not trainer.training or trainer.sanity_checking:
            return
        passes = (self.student_seen if torch.is_grad_enabled() else self.teacher_seen).setdefault(trainer.global_step, [])
        if not passes or name in passes[-1]:  # the first linear of a new forward pass
            passes.append({})
        passes[-1][name] = module.weight.detach().clone()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = self._step = trainer.global_step
        self.deltas.setdefault(step, {n: d.clone() for n, d in pl_module.lora_deltas().items()})
        self.batch.setdefault(step, batch.detach().clone())
        self.targets.setdefault(step, []).append(pl_module.distill_target)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss[self._step] = float(loss)  # an accumulated step: its last micro-batch


def plain_logits(weights: dict[str, torch.Tensor] | None, batch: torch.Tensor) -> torch.Tensor:
    """Logits of a plain tiny LLaMA (the module's base, no adapters) whose decoder linears hold ``weights``."""
    model = make_tiny_llama()
    with torch.no_grad():
        for name, linear in decoder_linears(model).items():
            if weights is not None:
                linear.weight.copy_(weights[name])
        return model(input_ids=batch).logits.double()


def hand_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> float:
    """Mean over the scored positions of Σ_v p·(log p − log q), p = softmax(teacher / T), q = softmax(student / T)."""
    p = torch.softmax(teacher[:, :-1] / temperature, dim=-1)
    q = torch.softmax(student[:, :-1] / temperature, dim=-1)
    return float((p * (p.log() - q.log())).sum(-1).mean())


def fit(distill: dict | None, module: NPFTModule | None = None, **trainer_kw):
    module = module or make_module()
    clean = {n: lin.weight.detach().clone() for n, lin in module.decoder_linears().items()}
    # RTN-2: an error large enough for the KL term to stand far above float32 rounding on the tiny model
    noise = NoisePerturbation(QuantErrorNoise(RTN(2)), seed=SEED, step_probability=STEP_PROBABILITY, distill=distill)
    probe, logger = TeacherStudentProbe(), StepLogger()
    trainer = make_trainer([OutlierSelection(OutlierSelector(method="all")), noise, probe], logger=logger, **trainer_kw)
    trainer.fit(module, datamodule=make_datamodule())
    return module, clean, noise, probe, logger


@pytest.mark.parametrize("teacher", ["self", "frozen"])
def test_a_perturbed_step_loss_is_ce_mixed_with_the_kl_from_a_separate_clean_forward(teacher):
    temperature, weight = 2.0, 0.5
    module, clean, noise, probe, logger = fit({"teacher": teacher, "temperature": temperature, "weight": weight})
    assert {s for s in range(STEPS) if noise._step_is_perturbed(0, s)} == PERTURBED
    for step in range(STEPS):
        batch, deltas = probe.batch[step], probe.deltas[step]
        (student,) = probe.student_seen[step]
        effective = {n: student[n] + deltas[n] for n in clean}  # the weight the step's forward pass used
        student_logits = plain_logits(effective, batch)
        ce = float(torch.nn.functional.cross_entropy(student_logits[:, :-1].reshape(-1, student_logits.size(-1)),
                                                     batch[:, 1:].reshape(-1)))
        if step not in PERTURBED:
            assert step not in probe.teacher_seen and probe.targets[step] == [None]
            assert "train/kl" not in logger.rows[step]
            assert probe.loss[step] == pytest.approx(ce, rel=1e-5, abs=0)
            continue
        assert any(not torch.equal(student[n], clean[n]) for n in clean)  # the student read the quantized weights
        merged = {n: clean[n] + deltas[n] for n in clean}
        teacher_logits = plain_logits(merged if teacher == "self" else None, batch)  # a separate clean forward
        kl = hand_kl(student_logits, teacher_logits, temperature)
        assert kl > 1e-3
        assert logger.rows[step]["train/kl"] == pytest.approx(kl, rel=1e-4, abs=0)
        expected = (1 - weight) * ce + weight * temperature**2 * kl
        assert probe.loss[step] == pytest.approx(expected, rel=1e-5, abs=0)
        # the logits handed to the step are those of the teacher
        (target,) = probe.targets[step]
        torch.testing.assert_close(target.teacher_logits.double(), teacher_logits, rtol=0, atol=1e-5)


def test_the_teacher_reads_the_clean_weights_without_gradient_also_inside_an_accumulated_step():
    """Two micro-batches per optimizer step: the first teacher runs before the draw, the second while the draw is in
    place; both read the clean weights under no_grad (no autograd graph on their logits), and the student of the
    second micro-batch reads the step's draw again, bit for bit."""
    module, clean, noise, probe, logger = fit({"teacher": "self"}, steps=3, accumulate_grad_batches=2)
    perturbed = {s for s in range(3) if noise._step_is_perturbed(0, s)}
    assert perturbed == PERTURBED & {0, 1, 2}
    for step in range(3):
        assert len(probe.student_seen[step]) == 2 and len(probe.targets[step]) == 2
        if step not in perturbed:
            assert step not in probe.teacher_seen and probe.targets[step] == [None, None]
            continue
        assert len(probe.teacher_seen[step]) == 2
        for seen in probe.teacher_seen[step]:
            assert seen.keys() == clean.keys() and all(torch.equal(seen[n], clean[n]) for n in clean), "the teacher saw noise"
        first, second = probe.student_seen[step]
        assert any(not torch.equal(first[n], clean[n]) for n in clean)
        assert all(torch.equal(first[n], second[n]) for n in clean), "the draw was not put back after the teacher"
        for target in probe.targets[step]:
            assert not target.teacher_logits.requires_grad and target.teacher_logits.grad_fn is None
    assert all(torch.equal(lin.weight, clean[n]) for n, lin in module.decoder_linears().items())


def test_clean_steps_are_bit_identical_to_a_run_without_distillation():
    """lr = 0 keeps the adapters fixed, so every clean step of the distilling run must give the loss of the same step
    without distillation to the last bit (LoRA dropout on: the teacher must not shift the dropout masks); the
    perturbed steps differ."""
    losses = []
    for distill in (None, {"teacher": "self", "weight": 0.5}):
        module = NPFTModule(make_tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.1),
                            optimizer=partial(torch.optim.AdamW, lr=0.0))
        with torch.no_grad():
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        _, _, _, probe, logger = fit(distill, module=module)
        losses.append(probe.loss)
        assert ("train/kl" in logger.rows[0]) == (distill is not None)
    plain, distilled = losses
    assert sorted(plain) == sorted(distilled) == list(range(STEPS))
    for step in range(STEPS):
        if step in PERTURBED:
            assert distilled[step] != plain[step]
        else:
            assert distilled[step] == plain[step], f"clean step {step} changed"


def test_chunked_kl_and_its_gradient_equal_the_whole_sequence_at_once():
    torch.manual_seed(0)
    student = torch.randn(2, 9, 11, requires_grad=True)
    teacher = torch.randn(2, 9, 11)
    whole = kl_to_teacher(student, teacher, 1.5, chunk=10**6)
    (grad_whole,) = torch.autograd.grad(whole, student)
    chunked = kl_to_teacher(student, teacher, 1.5, chunk=5)
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    assert float(whole) == pytest.approx(hand_kl(student.detach().double(), teacher.double(), 1.5), rel=1e-6)
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(grad_chunked, grad_whole)
    assert float(grad_whole[:, -1].abs().max()) == 0  # the last position predicts no scored token


@pytest.mark.parametrize("settings, message", [
    ({"teacher": "oracle"}, "noise.distill.teacher=oracle is not one of self, frozen, null"),
    ({"teacher": "self", "temperature": 0}, "noise.distill.temperature=0 must be a finite number > 0"),
    ({"teacher": "self", "weight": 1.5}, "noise.distill.weight=1.5 must be in (0, 1]"),
])
def test_bad_distillation_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Distillation(**settings)
