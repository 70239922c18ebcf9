"""Training objectives of the teacher and the student, per mode.

* Teacher (online, offline, base): CE on its labels only. The teacher never learns from the student.
* Online student: ``(1−α)·CE + α·T²·KL`` through the fused :func:`spacedkd_fast.kd_loss`, plus
  ``β·‖P(f_s) − f_t‖₂``: the un-squared L2 distance over the whole batch between the projected student feature and
  the teacher's (``torch.dist``, as the official code), P a 2-layer MLP trained with the student.
* ``kd_objective="paper"`` reproduces the official online code's soft loss, ``KLDivLoss(batchmean)`` applied to two
  probability vectors: ``Σ p_t·(log p_t − p_s) / B``. It is not a KL (its gradient maximizes ⟨p_t, p_s⟩) and has
  no T²; it is here only to reproduce the paper's numbers.
* Distilled ViT student (DeiT): its training output stacks the class and distillation heads ``(2, B, C)``; the loss is
  ``(1−α)·CE(class head, y) + α·T²·KL(teacher ‖ distillation head)`` (DeiT: α = 0.5, T = 1), the KL through the fused
  loss. With ``kd_objective="paper"`` the KL is divided by the number of classes, as DeiT's (and the official
  Spaced-KD ViT code's) ``KL_sum / (B·C)`` normalization does.
* Self (BYOT): during replay ``CE(z_0, y) + Σ_exits [0.7·CE(z_i, y) + 0.3·KL_T(z_i ‖ z_0)] + β·Σ ‖A_i(f_i) − f_0‖₂``
  with the shallow exits as K students of the deepest one in one multi-student kd_loss call (no T², as the
  official code); the feature term covers the two shallowest exits (the official code skips exit 3). Outside
  replay, CE on the deepest exit only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spacedkd_fast.loss.api import kd_loss_with
from spacedkd_fast.loss.options import KDOptions


class Projector(nn.Module):
    """Student-feature projector ``D_s → (D_s + D_t)/2 → ReLU → D_t`` for the feature term."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        hidden = (student_dim + teacher_dim) // 2
        self.net = nn.Sequential(nn.Linear(student_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, teacher_dim))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


class SelfKDAdapters(nn.Module):
    """Linear adapters ``D → D`` for the feature term of the BYOT exits that have one: the shallowest
    ``num_adapters`` exits. ``forward(features (E, B, D)) -> (num_adapters, B, D)``."""

    def __init__(self, feature_dim: int, num_adapters: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(feature_dim, feature_dim) for _ in range(num_adapters))

    def forward(self, features: Tensor) -> Tensor:
        shallowest = features[-len(self.adapters):]
        return torch.stack([adapter(feature) for adapter, feature in zip(self.adapters, shallowest)])


def feature_distance(projected: Tensor, target: Tensor) -> Tensor:
    """Un-squared L2 (Frobenius) distance between two ``(B, D)`` batches, in fp32."""
    return torch.dist(projected.float(), target.float())


def paper_soft_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """The official online code's ``nn.KLDivLoss(reduction='batchmean')(softmax(s/T), softmax(t/T))`` (a quirk)."""
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)
    p_t = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(p_s, p_t, reduction="batchmean")


@dataclass(frozen=True)
class DistillObjective:
    """The online/offline student's objective (fp32 scalar), from the fields it needs: the KD options (T, α, ε),
    the official code's quirk (``paper``: ``kd_objective="paper"``) and the feature term's weight β."""

    options: KDOptions
    paper: bool = False
    beta: float = 0.0

    def __call__(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                 projected: Tensor | None = None, teacher_features: Tensor | None = None) -> Tensor:
        """``student_logits`` is ``(B, C)``, or ``(2, B, C)`` for a distilled ViT in training mode (class head,
        distillation head); teacher tensors are detached already. ``projected``: the projector's output on the
        student features, ``(B, D_teacher)`` (the feature term needs it and ``teacher_features``)."""
        o = self.options
        if student_logits.dim() == teacher_logits.dim() + 1:  # distilled ViT: DeiT's two-head objective
            class_head, dist_head = student_logits[0], student_logits[1]
            kl = kd_loss_with(dist_head, teacher_logits, None, o)  # T²·KL alone
            if self.paper:
                kl = kl / teacher_logits.shape[-1]
            ce = F.cross_entropy(class_head.float(), labels, label_smoothing=o.label_smoothing)
            loss = (1 - o.alpha) * ce + o.alpha * kl
        elif self.paper:
            ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=o.label_smoothing)
            loss = (1 - o.alpha) * ce + o.alpha * paper_soft_loss(student_logits, teacher_logits, o.temperature)
        else:
            loss = kd_loss_with(student_logits, teacher_logits, labels, o)
        if self.beta > 0 and projected is not None:
            loss = loss + self.beta * feature_distance(projected, teacher_features)
        return loss


@dataclass(frozen=True)
class SelfKDObjective:
    """BYOT's loss of one replayed batch, from the fields it needs: the KD options (T, α = the shallow exits' KD
    weight, ε, no T² as the official code) and β."""

    options: KDOptions
    beta: float = 0.0

    def __call__(self, logits: Tensor, labels: Tensor, features: Tensor | None = None,
                 projected: Tensor | None = None) -> Tensor:
        """``logits (E, B, C)`` deepest exit first; ``features (E, B, D)``; ``projected (A, B, D)``: the adapters'
        outputs on the A shallowest exits' features."""
        deepest = logits[0]
        loss = F.cross_entropy(deepest.float(), labels)
        per_exit = kd_loss_with(logits[1:], deepest.detach(), labels, self.options)  # (E-1,)
        loss = loss + per_exit.sum()
        if self.beta > 0 and projected is not None and features is not None:
            target = features[0].detach()
            for adapted in projected:
                loss = loss + self.beta * feature_distance(adapted, target)
        return loss
