"""Host-side launcher of the fused KD + CE Triton kernel."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from spacedkd_fast.kernels import launch
from spacedkd_fast.kernels.kd_loss import _kd_loss_fwd_kernel


def _launch_on_device(kernel, grid, args, kwargs) -> None:
    kernel[grid](*args, **kwargs)


# How a configured kernel is started. The compile gate (``compile_gate.py``) swaps in a compile-only version, so it
# goes through this launcher, and its heuristics, without a GPU.
_launcher: Callable = _launch_on_device


@contextlib.contextmanager
def launcher(fn: Callable) -> Iterator[None]:
    """Within the block, kernels are handed to ``fn(kernel, grid, args, kwargs)`` instead of being launched."""
    global _launcher
    previous, _launcher = _launcher, fn
    try:
        yield
    finally:
        _launcher = previous


def kd_loss_forward(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    *,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    grad_student: bool,
    grad_teacher: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Run the fused kernel and reduce its loss.

    Args:
        student: ``(K, R0, R1, V)`` logits, any strides, float32/bfloat16/float16.
        teacher: ``(R0, R1, V)`` logits, any strides.
        target: ``(N,)`` integer labels (N = R0·R1) or None.
        ce_weight / kd_weight: the weights of CE and KL (see the kernel's signature).
        reduction: "mean" / "sum" / "none"; with a small problem and "mean"/"sum" the kernel reduces in-launch.
        grad_student / grad_teacher: also write ∂loss/∂student, ∂loss_k/∂teacher.

    Returns:
        ``(loss, grad_student, grad_teacher)``: loss is ``(K,)`` for mean/sum, ``(K, N)`` fp32 per-row losses
        for "none". Gradients are ``(K, N, V)`` contiguous in the input's dtype: the gradients of the *reduced*
        loss (a mean's 1/count included), unscaled by any grad_output.
    """
    k, r0, r1, vocab = student.shape
    n = r0 * r1
    cfg = launch.kd_loss_config(n, k, vocab, reduced=reduction != "none",
                                column_stride=max(abs(student.stride(3)), abs(teacher.stride(2))))
    grid, single = cfg.pop("grid"), cfg["SINGLE_PROGRAM"]
    device = student.device
    loss = torch.empty((k,) if single else (k, n), dtype=torch.float32, device=device)
    grad_s = torch.empty((k, n, vocab), dtype=student.dtype, device=device) if grad_student else None
    grad_t = torch.empty((k, n, vocab), dtype=teacher.dtype, device=device) if grad_teacher else None
    has_target = target is not None
    y = target if has_target else loss  # any pointer; never read without a target
    mean = reduction == "mean"
    count = None
    if mean and not single:
        count = (target != ignore_index).sum(dtype=torch.float32) if has_target else torch.full(
            (), float(n), dtype=torch.float32, device=device)
    args = (
        loss,
        grad_s if grad_s is not None else loss,
        grad_t if grad_t is not None else loss,
        student, *student.stride(),
        teacher, *teacher.stride(),
        y, y.stride(0) if has_target else 0,
        k, n, r1, vocab,
        1.0 / temperature, ce_weight, kd_weight, label_smoothing, ignore_index,
        count if count is not None else loss,
    )
    kwargs = dict(
        HAS_TARGET=has_target,
        HAS_CE=has_target and ce_weight != 0.0,
        HAS_KD=kd_weight != 0.0,
        GRAD_S=grad_student,
        GRAD_T=grad_teacher and kd_weight != 0.0,
        TEMP_IS_ONE=temperature == 1.0,
        MEAN=mean,
        **cfg,
    )
    _launcher(_kd_loss_fwd_kernel, grid, args, kwargs)
    if grad_t is not None and kd_weight == 0.0:
        grad_t.zero_()  # the loss does not depend on the teacher
    if not single and reduction != "none":
        loss = loss.sum(dim=1)  # a mean's rows were already divided by the count
    return loss, grad_s, grad_t
