"""Distillation on the perturbed steps: the loss of a quantized step pulls towards a teacher's next-token distribution.

The teacher is the model on clean weights, run without gradient before the step's perturbation is written:
``self`` (W + ΔW_lora, the current adapters: the quantized model learns to predict what the unquantized one
predicts) or ``frozen`` (W, adapters disabled: the model before fine-tuning). The student is the perturbed
forward pass of the training step. With temperature T and weight w the step's loss is

    (1 − w) · CE + w · T² · KL(softmax(z_teacher / T) ‖ softmax(z_student / T))

(Hinton et al. 2015: T² keeps the gradient's size independent of T), the KL summed over the vocabulary and
averaged over the positions the cross-entropy scores (every position but the last).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

TEACHERS = ("self", "frozen")
# Positions per chunk of the KL: its float32 intermediates are [chunk, vocab] and recomputed in the backward pass
# (activation checkpointing) instead of being kept for the whole sequence (SmolLM2: 49 152 entries per position).
CHUNK_POSITIONS = 512


def _kl_sum(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Σ over positions and vocabulary of KL(softmax(teacher / T) ‖ softmax(student / T)), in float32."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def kl_to_teacher(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                  chunk: int = CHUNK_POSITIONS) -> Tensor:
    """Mean over the scored positions ([B, T−1] of [B, T, V] logits) of KL(teacher ‖ student) at ``temperature``.

    Computed ``chunk`` positions at a time, each chunk checkpointed, so the extra memory is one chunk's
    softmax, not the sequence's. The teacher gets no gradient.
    """
    student = student_logits[:, :-1].reshape(-1, student_logits.size(-1))
    teacher = teacher_logits[:, :-1].reshape(-1, teacher_logits.size(-1)).detach()
    total = student.new_zeros((), dtype=torch.float32)
    for start in range(0, student.size(0), chunk):
        part = slice(start, start + chunk)
        if torch.is_grad_enabled() and student.requires_grad:
            total = total + checkpoint(_kl_sum, student[part], teacher[part], temperature, use_reentrant=False)
        else:
            total = total + _kl_sum(student[part], teacher[part], temperature)
    return total / max(student.size(0), 1)


@dataclass(frozen=True)
class Distillation:
    """The settings of ``noise.distill``: ``teacher`` (``self``, ``frozen`` or None = off), ``temperature`` T > 0 and
    ``weight`` w in (0, 1] of the KL term (w = 1: the KL alone)."""

    teacher: str | None = None
    temperature: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.teacher is not None and self.teacher not in TEACHERS:
            raise ValueError(f"noise.distill.teacher={self.teacher} is not one of self, frozen, null (null = no distillation)")
        temperature, weight = self.temperature, self.weight
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"noise.distill.temperature={temperature} must be a finite number > 0, e.g. 1 (2 softens both distributions)")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (math.isfinite(weight) and 0 < weight <= 1):
            raise ValueError(f"noise.distill.weight={weight} must be in (0, 1]: the KL term's share of the loss (1 = the KL alone)")

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    def loss(self, cross_entropy: Tensor, kl: Tensor) -> Tensor:
        """(1 − w)·CE + w·T²·KL."""
        distilled = self.weight * self.temperature**2 * kl
        return distilled if self.weight == 1.0 else (1.0 - self.weight) * cross_entropy + distilled


@dataclass(frozen=True)
class DistillTarget:
    """What a perturbed training step distils towards: the teacher's logits for its batch, and the settings."""

    teacher_logits: Tensor
    distillation: Distillation

    def loss(self, cross_entropy: Tensor, student_logits: Tensor) -> tuple[Tensor, Tensor]:
        """The step's loss and the KL term (at temperature T, without the T² factor)."""
        kl = kl_to_teacher(student_logits, self.teacher_logits, self.distillation.temperature)
        return self.distillation.loss(cross_entropy, kl), kl
