"""Host-side launcher of the top-k teacher Triton kernel (``kd_loss_topk.py``)."""

from __future__ import annotations

import torch
from torch import Tensor

from spacedkd_fast.kernels import kd_loss_launch, launch
from spacedkd_fast.kernels.kd_loss_topk import _kd_loss_topk_kernel


def kd_loss_topk_forward(
    student: Tensor,
    indices: Tensor,
    values: Tensor,
    target: Tensor | None,
    *,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    bucket: bool,
    grad_student: bool,
) -> tuple[Tensor, Tensor | None]:
    """Run the kernel and reduce its loss.

    Args:
        student: ``(N, V)`` logits, any strides. indices / values: ``(N, k)`` teacher ids (int32/int64) and values.
        bucket: the "bucket" tail policy (values are log-probabilities at T = 1).

    Returns:
        ``(loss, grad_student)``: loss ``()`` for mean/sum, ``(N,)`` fp32 for "none"; the gradient ``(N, V)``
        contiguous in the student's dtype, that of the reduced loss (a mean's 1/count included).
    """
    n, vocab = student.shape
    k = indices.shape[-1]
    indices, values = indices.contiguous(), values.contiguous()
    cfg = launch.kd_loss_topk_config(n, vocab, k, column_stride=abs(student.stride(1)))
    grid = cfg.pop("grid")
    device = student.device
    loss = torch.empty((n,), dtype=torch.float32, device=device)
    grad = torch.empty((n, vocab), dtype=student.dtype, device=device) if grad_student else None
    has_target = target is not None
    y = target if has_target else loss
    mean = reduction == "mean"
    count = None
    if mean:
        count = (target != ignore_index).sum(dtype=torch.float32) if has_target else torch.full(
            (), float(n), dtype=torch.float32, device=device)
    args = (
        loss, grad if grad is not None else loss,
        student, student.stride(0), student.stride(1),
        indices, values,
        y, y.stride(0) if has_target else 0,
        n, vocab, k,
        1.0 / temperature, ce_weight, kd_weight, label_smoothing, ignore_index,
        count if count is not None else loss,
    )
    kwargs = dict(
        HAS_TARGET=has_target,
        HAS_CE=has_target and ce_weight != 0.0,
        HAS_KD=kd_weight != 0.0,
        GRAD_S=grad_student,
        TEMP_IS_ONE=temperature == 1.0,
        MEAN=mean,
        BUCKET=bucket and k < vocab,
        **cfg,
    )
    kd_loss_launch._launcher(_kd_loss_topk_kernel, grid, args, kwargs)  # the compile gate swaps the launcher
    if reduction != "none":
        loss = loss.sum()  # a mean's rows were already divided by the count
    return loss, grad
