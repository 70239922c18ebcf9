"""Pure-PyTorch fused KD + CE loss: **the spec**.

Per row ``i`` with student logits ``s``, teacher logits ``t``, label ``y``, temperature ``T > 0``,
weight ``α ∈ [0, 1]`` and label smoothing ``ε ∈ [0, 1)``::

    loss_i = (1 − α) · CE_ε(s, y) + α · c · KL( softmax(t/T) ‖ softmax(s/T) ),   c = T² (or 1: t_squared=False)
    CE_ε(s, y) = (1 − ε) · (lse(s) − s_y) + ε · (lse(s) − mean_U(s))             (CE at T = 1)

``U`` is the row's set of unmasked tokens (below) and ``mean_U(s)`` the mean of ``s`` over it; with nothing masked
U is the whole vocabulary and CE_ε is ``F.cross_entropy(..., label_smoothing=ε)``.

* ``target=None``: ``loss_i = c · KL`` (α is not applied, no row is ignored).
* Rows whose label equals ``ignore_index`` contribute zero loss and zero gradient, whatever their logits hold.
* ``reduction="mean"`` divides the sum by the number of non-ignored rows (0 when there are none),
  ``"sum"`` sums, ``"none"`` returns per-row losses.
* α weights the KL term (torchtune's ``kd_ratio`` convention). torchdistill's α is the CE weight; to reproduce
  its ``KDLoss`` use ``alpha = 1 − α_torchdistill``.

**Masked vocabulary** (−inf logits: padded, banned or absent tokens):

* A *masked token* of a row is one whose **student** logit is −inf: the student gives it probability 0 and it is
  outside the row's vocabulary U. Label smoothing spreads ε uniformly over U only (ε/|U| per unmasked token, none
  on a masked one), so a token masked in both student and teacher is as if its column were not there.
* A **teacher** logit of −inf is a teacher probability of exactly 0: it contributes 0 to the KL (the limit
  ``0·log 0 = 0``), whatever the student logit there (−inf included).
* Teacher probability > 0 on a masked token gives KL = **+inf** (the student cannot represent that mass), and a label
  on a masked token gives CE = +inf: that row's loss is +inf, not NaN (unless its weight α, resp. 1 − α, is 0).
  Nothing is clipped: an infinite loss says that the mask contradicts the teacher or the label.
* Gradients are the closed forms below, which are the limits of the derivatives as masked logits go to −inf::

      ∂loss/∂s = (1−α)·(softmax(s) − (1−ε)·onehot(y) − ε·1_U/|U|) + (α·c/T)·(softmax(s/T) − softmax(t/T))

  They are finite, and 0 on every masked token, except the tokens that make the loss +inf: the label's carries
  −(1−α)(1−ε), a token with teacher mass p carries −(α·c/T)·p. The teacher gradient (``teacher_grad=True``) is 0
  where the teacher's probability is 0; in a row whose KL is +inf it is not finite (the derivative of +inf).
* A row with no unmasked token (every student logit −inf), or a teacher row of −inf only, has no distribution:
  its loss and gradient are NaN. Rows that are all padding should be ignored (label ``ignore_index``), which gives
  them 0 like every ignored row; with ``target=None`` there is no way to ignore a row.
* NaN and +inf logits propagate: that row's loss and gradient are not finite.

**Vocabulary mismatch** (``vocab_mismatch``): the vocabulary is the student's, V = Vs (its last dimension; labels
are in ``[0, Vs)``). A teacher with Vt > Vs raises by default (a silent truncation could hide a tokenizer mismatch);
``vocab_mismatch="truncate"`` restricts the teacher's distribution to the student's ids ``0..Vs−1`` and renormalizes
it, which is exactly ``softmax(t[..., :Vs] / T)``: the teacher logits are sliced, as a strided view (no copy), and
the teacher mass on ids ≥ Vs is dropped. It is right when both tokenizers agree on ids ``0..Vs−1`` and the teacher's
extra ids are padding or tokens the student lacks (e.g. Qwen2.5 heads of 152064 and 151936 rows). The teacher
gradient of the columns ``Vs..Vt−1`` is 0. A teacher with Vt < Vs always raises (pad it with −inf, probability 0,
if that is what is meant).

**dtypes**: float64 inputs (student or teacher) are computed in float64 and give a float64 loss and float64
gradients; every other dtype is computed in float32 (the kernels' accumulation dtype) and gives a float32 loss and
gradients in the input's dtype. In the float32 kernels a teacher probability below float32's smallest normal
relative to the row's largest (a logit about 87·T below the teacher's max) underflows to 0 and counts as no mass.

This module is the torch backend of :func:`spacedkd_fast.kd_loss`, the oracle every test compares the Triton and
C++ kernels against (in float64), and the baseline of every benchmark. It is written for clarity, not speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from spacedkd_fast.loss.args import KDProblem, canonicalize
from spacedkd_fast.loss.options import KDOptions

__all__ = ["ce_reference", "kd_loss_reference", "kd_loss_rows_reference", "kd_loss_terms_reference", "reduce_rows",
           "rows_reduced_reference"]


def kd_loss_terms_reference(student: Tensor, teacher: Tensor, target: Tensor | None,
                            options: KDOptions) -> tuple[Tensor | None, Tensor]:
    """The two terms of every row: ``(CE_ε(s, y), KL(softmax(t/T) ‖ softmax(s/T)))``, unweighted.

    Args:
        student: ``(K, N, V)`` logits of K students (K = 1 for the ordinary case); any float dtype.
        teacher: ``(N, V)`` logits shared by the K students (or ``(K, N, V)``, one copy per student).
        target: ``(N,)`` integer labels, or None (then CE is None and no row is ignored).
        options: T, ε and the ignore index (the weights are applied by the caller).

    Returns:
        ``(ce, kl)``, each ``(K, N)``, float64 for float64 inputs and float32 otherwise; ignored rows are 0.
    """
    temperature, label_smoothing, ignore_index = options.temperature, options.label_smoothing, options.ignore_index
    compute_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    s = student.to(compute_dtype)
    t = teacher.to(compute_dtype)
    zero = torch.zeros((), dtype=compute_dtype, device=s.device)
    if target is not None:
        valid = target != ignore_index  # (N,)
        # Zero the ignored rows first so that a NaN there cannot leak into the gradient through 0 · NaN.
        s = torch.where(valid[:, None], s, zero)
        t = torch.where(valid[:, None], t, zero)

    log_q = F.log_softmax(s / temperature, dim=-1)  # (K, N, V) student at temperature T
    log_p = F.log_softmax(t / temperature, dim=-1)  # (N, V)    teacher at temperature T
    p = log_p.exp()
    # Where the teacher has no mass the term is 0 (0·log 0 = 0), also where the student has none either
    # (−inf − −inf). The difference is masked *before* the product: masking the product would leave 0·NaN in its
    # gradient with respect to the teacher.
    kl = (p * torch.where(p == 0, zero, log_p - log_q)).sum(dim=-1)  # (K, N)
    if target is None:
        return None, kl

    return torch.where(valid, ce_reference(s, target, valid, label_smoothing), zero), torch.where(valid, kl, zero)


def ce_reference(s: Tensor, target: Tensor, valid: Tensor, label_smoothing: float) -> Tensor:
    """``CE_ε(s, y)`` per row at T = 1, over the unmasked tokens U (the CE term of every kd_loss form, the dense
    teacher's and the top-k teacher's alike).

    Args:
        s: ``(..., N, V)`` student logits in the compute dtype, ignored rows already zeroed.
        target: ``(N,)`` labels; ``valid``: ``(N,)`` the rows that are not ignored (others read label 0).
    """
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    log_s = F.log_softmax(s, dim=-1)  # student at T = 1
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    nll = -log_s.gather(-1, safe_target.expand(log_s.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # lse(s) − s_y
    if label_smoothing == 0.0:
        return nll
    # lse(s) − mean_U(s): the mean over the unmasked tokens U (student logit > −inf) only; masked tokens are
    # outside the vocabulary, and their log-probability −inf never enters the sum (nor, through it, a gradient).
    unmasked = s != float("-inf")
    smooth = -torch.where(unmasked, log_s, zero).sum(dim=-1) / unmasked.sum(dim=-1)
    return (1.0 - label_smoothing) * nll + label_smoothing * smooth


def kd_loss_rows_reference(student: Tensor, teacher: Tensor, target: Tensor | None, options: KDOptions) -> Tensor:
    """Per-row losses: ``ce_weight · CE + kd_weight · KL`` with the weights of ``options`` (``(1 − α, α·c)``, or
    ``(0, c)`` without a target).

    Args:
        student: ``(K, N, V)`` logits of K students (K = 1 for the ordinary case); any float dtype.
        teacher: ``(N, V)`` logits shared by the K students.
        target: ``(N,)`` integer labels, or None for the KL term alone.

    Returns:
        ``(K, N)`` losses in float64 for float64 inputs, float32 otherwise. Gradients flow to ``student`` and,
        unless the caller detached it, to ``teacher``.
    """
    ce, kl = kd_loss_terms_reference(student, teacher, target, options)
    ce_weight, kd_weight = options.weights(target is not None)
    # A term of weight 0 is left out, not multiplied by 0: an infinite term (masked label, teacher mass on a
    # masked token) would make it NaN. The kernels skip it the same way.
    if ce is None or ce_weight == 0.0:
        return kd_weight * kl
    if kd_weight == 0.0:
        return ce_weight * ce
    return ce_weight * ce + kd_weight * kl


def reduce_rows(rows: Tensor, problem: KDProblem, reduction: str) -> Tensor:
    """Reduce ``(K, N)`` per-row losses to the public output shape of :func:`spacedkd_fast.kd_loss`.

    ``"mean"`` divides by the number of non-ignored rows, kept on the device (no host sync); with none it is 0.
    """
    if reduction == "none":
        return rows.reshape(problem.none_shape)
    total = rows.sum(dim=-1)  # (K,)
    if reduction == "mean":
        total = total / problem.valid_count(rows.dtype).clamp_min(1)
    return total if problem.multi_student else total.squeeze(0)


def kd_loss_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    t_squared: bool = True,
    teacher_grad: bool = False,
    vocab_mismatch: str = "error",
) -> Tensor:
    """The spec, with the public signature of :func:`spacedkd_fast.kd_loss` (minus ``backend``).

    Accepts the same shapes (``(..., V)``, or ``(K, ..., V)`` students over one ``(..., V)`` teacher) and checks
    its arguments the same way. Autograd provides the gradients.
    """
    options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                        ignore_index=ignore_index, reduction=reduction, t_squared=t_squared,
                        teacher_grad=teacher_grad, vocab_mismatch=vocab_mismatch)
    problem = canonicalize(student_logits, teacher_logits, target, options)
    return rows_reduced_reference(problem, options)


def rows_reduced_reference(problem: KDProblem, options: KDOptions) -> Tensor:
    """The reference loss of a checked problem, in its public shape (the "torch" backend of ``kd_loss``): float64
    for float64 inputs, float32 otherwise."""
    teacher = problem.teacher_rows()
    if not options.teacher_grad:
        teacher = teacher.detach()
    rows = kd_loss_rows_reference(problem.student_rows(), teacher, problem.target, options)
    return reduce_rows(rows, problem, options.reduction)
