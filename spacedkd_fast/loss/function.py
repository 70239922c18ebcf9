"""The fused kd_loss as a ``torch.library`` custom op with autograd.

The forward launches the Triton or C++ kernel, which writes the loss *and* the gradients of the (reduced) loss in
the same pass over the logits. The backward only multiplies those saved gradients by ``grad_output`` (a scalar
per student, or one value per row for ``reduction="none"``), so it is exact for any upstream gradient, including
when the loss is not the last op. Registered as a custom op with a fake implementation, so
``torch.compile(fullgraph=True)`` traces through it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from spacedkd_fast.loss.args import KDProblem


def _problem(student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int) -> KDProblem:
    multi = student.dim() == teacher.dim() + 1
    return KDProblem(student=student, teacher=teacher, target=target, multi_student=multi,
                     lead_shape=tuple(teacher.shape[:-1]), ignore_index=ignore_index)


def _output_shapes(problem: KDProblem, reduction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    loss_shape = problem.none_shape if reduction == "none" else problem.reduced_shape
    grad_t_shape = (problem.num_students, *problem.teacher.shape)
    return loss_shape, grad_t_shape


def _run_cpp(problem: KDProblem, student4, teacher3, temperature, ce_weight, kd_weight, label_smoothing,
             reduction, grad_student, grad_teacher):
    from spacedkd_fast import _C

    target = problem.target
    if target is not None:
        target = target.to(torch.int64).contiguous()
    # On CPU the number of non-ignored rows costs no sync: count it once, for the gradient scale and the loss.
    count = 1
    if reduction == "mean":
        count = max(problem.num_rows if target is None else int((target != problem.ignore_index).sum()), 1)
    loss, grad_s, grad_t = _C.kd_loss_forward(
        student4, teacher3, target, temperature, ce_weight, kd_weight, label_smoothing, problem.ignore_index,
        1.0 / count, grad_student, grad_teacher)
    if reduction != "none":
        loss = loss.sum(dim=1) / count
    return loss, grad_s, grad_t


def _run_triton(problem: KDProblem, student4, teacher3, temperature, ce_weight, kd_weight, label_smoothing,
                reduction, grad_student, grad_teacher):
    from spacedkd_fast.kernels import kd_loss_forward

    return kd_loss_forward(
        student4, teacher3, problem.target, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
        label_smoothing=label_smoothing, ignore_index=problem.ignore_index, reduction=reduction,
        grad_student=grad_student, grad_teacher=grad_teacher)


@torch.library.custom_op("spacedkd_fast::kd_loss_fused", mutates_args=())
def kd_loss_fused(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and saved gradients of one kd_loss call (arguments already checked by ``canonicalize``).

    Args:
        student: ``(..., V)`` or ``(K, ..., V)``; teacher ``(..., V)``; target ``(N,)`` flattened labels or None.
        ce_weight, kd_weight: ``1 − α`` and ``α·T²`` (see :func:`spacedkd_fast.loss.api.kd_loss`).
        backend: "triton" or "cpp".

    Returns:
        ``(loss, grad_student, grad_teacher)``: the loss in its public shape (fp32); the gradient of the reduced
        loss w.r.t. ``student`` (its shape and dtype; empty when not asked); and ``(K, *teacher.shape)``
        per-student gradients w.r.t. ``teacher`` (empty when not asked).
    """
    problem = _problem(student, teacher, target, ignore_index)
    loss_shape, grad_t_shape = _output_shapes(problem, reduction)
    if problem.num_rows == 0 or problem.num_students == 0:
        return (torch.zeros(loss_shape, dtype=torch.float32, device=student.device),
                torch.zeros_like(student) if grad_student else student.new_empty(0),
                teacher.new_zeros(grad_t_shape) if grad_teacher else teacher.new_empty(0))
    student4, teacher3 = problem.strided_views()
    run = _run_triton if backend == "triton" else _run_cpp
    loss, grad_s, grad_t = run(problem, student4, teacher3, temperature, ce_weight, kd_weight, label_smoothing,
                               reduction, grad_student, grad_teacher)
    return (loss.reshape(loss_shape),
            grad_s.view(student.shape) if grad_student else student.new_empty(0),
            grad_t.view(grad_t_shape) if grad_teacher else teacher.new_empty(0))


@kd_loss_fused.register_fake
def _(student, teacher, target, temperature, ce_weight, kd_weight, label_smoothing, ignore_index, reduction,
      grad_student, grad_teacher, backend):
    problem = _problem(student, teacher, target, ignore_index)
    loss_shape, grad_t_shape = _output_shapes(problem, reduction)
    return (student.new_empty(loss_shape, dtype=torch.float32),
            student.new_empty(student.shape) if grad_student else student.new_empty(0),
            teacher.new_empty(grad_t_shape) if grad_teacher else teacher.new_empty(0))


def _setup_context(ctx, inputs, output):
    student, teacher = inputs[0], inputs[1]
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no zero tensors for the two non-differentiable outputs: backward is one mul
    ctx.save_for_backward(grad_s, grad_t)
    ctx.multi = student.dim() == teacher.dim() + 1
    ctx.teacher_dim = teacher.dim()
    ctx.reduction = inputs[8]
    ctx.has_grad_s = inputs[9]
    ctx.has_grad_t = inputs[10]


def _backward(ctx, grad_loss, _grad_s_unused, _grad_t_unused):
    grad_s, grad_t = ctx.saved_tensors
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * 12
    # grad_loss has the loss's shape: (K?,) for mean/sum, (K?, *lead) for none. Broadcast it over V (and, for a
    # reduced loss, over the rows): one multiply, whatever grad_loss holds.
    if ctx.reduction == "none":
        scale = grad_loss.unsqueeze(-1)
    else:
        scale = grad_loss.reshape(grad_loss.shape + (1,) * ctx.teacher_dim)
    d_student = grad_s * scale if ctx.has_grad_s else None
    d_teacher = None
    if ctx.has_grad_t:
        # grad_t is (K, *teacher.shape): the teacher's gradient sums the K students' contributions.
        k_scale = scale if ctx.multi else scale.unsqueeze(0)
        if grad_t.shape[0] == 1:
            d_teacher = (grad_t * k_scale)[0]
        else:
            d_teacher = (grad_t.float() * k_scale).sum(dim=0).to(grad_t.dtype)
    return d_student, d_teacher, None, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("spacedkd_fast::kd_loss_fused", _backward, setup_context=_setup_context)


def fused_kd_loss(problem: KDProblem, *, temperature: float, alpha: float, label_smoothing: float,
                  reduction: str, t_squared: bool, teacher_grad: bool, backend: str) -> Tensor:
    """Run a checked problem through the custom op (Triton or C++ backend)."""
    kd_scale = temperature * temperature if t_squared else 1.0
    has_target = problem.target is not None
    ce_weight = 1.0 - alpha if has_target else 0.0
    kd_weight = alpha * kd_scale if has_target else kd_scale
    grad_enabled = torch.is_grad_enabled()
    grad_student = grad_enabled and problem.student.requires_grad
    grad_teacher = grad_enabled and teacher_grad and problem.teacher.requires_grad
    teacher = problem.teacher if grad_teacher else problem.teacher.detach()
    loss, _, _ = kd_loss_fused(
        problem.student, teacher, problem.target, float(temperature), float(ce_weight), float(kd_weight),
        float(label_smoothing), int(problem.ignore_index), reduction, grad_student, grad_teacher, backend)
    return loss


__all__ = ["kd_loss_fused", "fused_kd_loss"]
