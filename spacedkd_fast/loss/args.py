"""Argument checking and shape canonicalization shared by every kd_loss backend.

Every public entry point (``kd_loss``, ``KDLoss``, ``kd_loss_reference``) goes through :func:`canonicalize`, so
each backend sees the same problem: K students of shape ``(K, N, V)`` over one teacher ``(N, V)`` and an optional
``(N,)`` target, and every bad argument is rejected with a message that names it, before any work is done.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

from spacedkd_fast.loss.options import REDUCTIONS, KDOptions, _fail

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
__all__ = ["REDUCTIONS", "FLOAT_DTYPES", "KDProblem", "canonicalize", "check_target_values", "flat_checked_target"]


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(TypeError, f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                         f"got dtype {x.dtype}")
    if x.dim() == 0:
        _fail(ValueError, f"{name} must have a vocabulary dimension, shape (..., V); got a 0-dim tensor")


def check_target_values(target: Tensor, vocab: int, ignore_index: int) -> None:
    """Raise if a label is outside ``[0, V)`` and not ``ignore_index``.

    Free on CPU tensors (the C++ kernel does it in its own pass over the labels instead). On CUDA it costs a host
    sync, so it runs there only with ``SPACEDKD_CHECK_TARGETS=1``; otherwise the kernels give such rows a NaN loss
    and NaN gradient (never a silent wrong value).
    """
    if torch.compiler.is_compiling():
        return
    if target.device.type != "cpu" and os.environ.get("SPACEDKD_CHECK_TARGETS", "0") != "1":
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        values = target[bad][:5].tolist()
        _fail(ValueError, f"target holds labels outside [0, {vocab}) that are not ignore_index={ignore_index}: "
                          f"{values}{' ...' if int(bad.sum()) > 5 else ''}")


def flat_checked_target(target, lead_shape: tuple[int, ...], shaped_like: str, shaped_like_shape: tuple[int, ...],
                        device: torch.device, on_device: str) -> Tensor | None:
    """The labels of a loss call as ``(N,)``, after checking them (every loss's one rule): None, or a tensor of
    integer class indices of ``lead_shape``, the leading shape of the argument named ``shaped_like`` (of shape
    ``shaped_like_shape``), on ``device`` (``on_device`` names what is there, as "student_logits is").
    Their values are checked apart (:func:`check_target_values`), where the backend does not."""
    if target is None:
        return None
    if not isinstance(target, Tensor):
        _fail(TypeError, f"target must be a torch.Tensor of class indices or None, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        _fail(TypeError, f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if tuple(target.shape) != lead_shape:
        _fail(ValueError, f"target shape {tuple(target.shape)} does not match the leading shape {lead_shape} of "
                          f"{shaped_like} {shaped_like_shape}: one label per row")
    if target.device != device:
        _fail(ValueError, f"target is on {target.device} but {on_device} on {device}")
    return target.reshape(-1)


@dataclass(frozen=True)
class KDProblem:
    """A checked kd_loss call, in canonical shapes.

    Attributes:
        student: the caller's student logits, ``(..., V)`` or ``(K, ..., V)``.
        teacher: the caller's teacher logits, ``(..., V)`` (a view of its first V columns when a larger teacher
            vocabulary is truncated: ``vocab_mismatch="truncate"``).
        target: ``(N,)`` integer labels or None.
        multi_student: True when ``student`` has the extra leading K dimension.
        lead_shape: the teacher's leading shape; ``N = prod(lead_shape)``.
    """

    student: Tensor
    teacher: Tensor
    target: Tensor | None
    multi_student: bool
    lead_shape: tuple[int, ...]
    ignore_index: int

    @property
    def num_students(self) -> int:
        return self.student.shape[0] if self.multi_student else 1

    @property
    def num_rows(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def vocab(self) -> int:
        return self.teacher.shape[-1]

    @property
    def none_shape(self) -> tuple[int, ...]:
        """Output shape of ``reduction="none"``."""
        return ((self.num_students,) if self.multi_student else ()) + self.lead_shape

    @property
    def reduced_shape(self) -> tuple[int, ...]:
        """Output shape of ``reduction="mean"`` / ``"sum"``: ``(K,)`` for K students, ``()`` otherwise."""
        return (self.num_students,) if self.multi_student else ()

    def student_rows(self) -> Tensor:
        """``(K, N, V)`` (a view when the strides allow it, else a copy)."""
        return self.student.reshape(self.num_students, self.num_rows, self.vocab)

    def teacher_rows(self) -> Tensor:
        """``(N, V)`` (a view when the strides allow it, else a copy)."""
        return self.teacher.reshape(self.num_rows, self.vocab)

    def valid_count(self, dtype: torch.dtype) -> Tensor:
        """Number of non-ignored rows as a 0-dim device tensor (no host sync)."""
        if self.target is None:
            return torch.tensor(self.num_rows, dtype=dtype, device=self.teacher.device)
        return (self.target != self.ignore_index).sum().to(dtype)

    def strided_views(self) -> tuple[Tensor, Tensor]:
        """Views ``student (K, R0, R1, V)`` and ``teacher (R0, R1, V)`` with ``R0·R1 = N``, without copying.

        Kernels address row ``n`` as ``(n // R1, n % R1)`` through two strides, which covers contiguous inputs,
        column slices (any row stride) and the common non-mergeable ``(B, T, V)`` cases (a time shift
        ``x[:, :-1]``, a transposed batch). Only inputs that need three or more strided levels are copied.
        """
        student, teacher = self.student, self.teacher
        if student.is_contiguous() and teacher.is_contiguous():  # the usual case: no stride to work out
            n, v = self.num_rows, self.vocab
            return student.view(self.num_students, 1, n, v), teacher.view(1, n, v)
        for _ in range(3):
            groups = _row_groups(self, student, teacher)
            if groups is not None:
                break
            # Copy the teacher first (it usually needs no grad), then the student.
            teacher, student = (teacher.contiguous(), student) if not teacher.is_contiguous() else (
                teacher, student.contiguous())
        (r0, s0, t0), (r1, s1, t1) = groups
        k = self.num_students
        sk = student.stride(0) if self.multi_student else 0
        student_4d = student.as_strided((k, r0, r1, self.vocab), (sk, s0, s1, student.stride(-1)))
        teacher_3d = teacher.as_strided((r0, r1, self.vocab), (t0, t1, teacher.stride(-1)))
        return student_4d, teacher_3d


def _row_groups(problem: KDProblem, student: Tensor, teacher: Tensor):
    """Merge the leading dims of student and teacher into ≤ 2 (size, student stride, teacher stride) groups."""
    offset = 1 if problem.multi_student else 0
    s_strides = student.stride()[offset:-1]
    t_strides = teacher.stride()[:-1]
    groups: list[list[int]] = []
    for size, ss, ts in zip(problem.lead_shape, s_strides, t_strides):
        if size == 1:
            continue
        if groups and groups[-1][1] == ss * size and groups[-1][2] == ts * size:
            groups[-1] = [groups[-1][0] * size, ss, ts]
        else:
            groups.append([size, ss, ts])
    if len(groups) > 2:
        return None
    while len(groups) < 2:
        groups.insert(0, [1, 0, 0])
    return [tuple(g) for g in groups]


def canonicalize(student_logits, teacher_logits, target, options: KDOptions, *,
                 check_targets: bool = True) -> KDProblem:
    """Check the tensors of a kd_loss call against each other and against ``options`` (already checked: a
    :class:`~spacedkd_fast.loss.options.KDOptions`) and return the canonical problem.

    A teacher with a larger vocabulary than the student's is sliced to the student's (a view) when
    ``options.vocab_mismatch == "truncate"``, and rejected otherwise; a smaller one is always rejected.

    ``check_targets=False`` leaves the label *values* to the caller (:func:`check_target_values`), for backends
    that check them on their own.

    Raises:
        TypeError / ValueError naming the offending argument and what was expected.
    """
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    s_shape, t_shape = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s_shape[:-1] == t_shape[:-1]:
        multi = False
    elif len(s_shape) == len(t_shape) + 1 and s_shape[1:-1] == t_shape[:-1]:
        multi = True
    else:
        _fail(ValueError, f"student_logits shape {s_shape} does not match teacher_logits shape {t_shape}: expected "
                          f"the same shape, or (K, *teacher shape) for K students")
    vocab, teacher_vocab = s_shape[-1], t_shape[-1]
    if vocab == 0 or teacher_vocab == 0:
        _fail(ValueError, f"the vocabulary dimension (last) of the logits is 0: student_logits {s_shape}, "
                          f"teacher_logits {t_shape}")
    if teacher_vocab < vocab:
        _fail(ValueError, f"student_logits shape {s_shape} does not match teacher_logits shape {t_shape}: the "
                          f"teacher's vocabulary (last dimension, {teacher_vocab}) is smaller than the student's "
                          f"({vocab}). The teacher must cover every student id; if the missing ids should have teacher "
                          f"probability 0, pad teacher_logits with -inf to {vocab} columns")
    if teacher_vocab > vocab:
        if options.vocab_mismatch != "truncate":
            _fail(ValueError, f"student_logits shape {s_shape} does not match teacher_logits shape {t_shape}: the "
                              f"teacher's vocabulary (last dimension, {teacher_vocab}) is larger than the student's "
                              f"({vocab}). Pass vocab_mismatch='truncate' to restrict the teacher to the student's ids "
                              f"0..{vocab - 1} (renormalized over them; no copy), or slice teacher_logits yourself")
        # The teacher restricted to the student's ids, renormalized: softmax over the first Vs logits. A view with
        # row stride Vt, which every backend reads as it is.
        teacher_logits = teacher_logits[..., :vocab]
    if student_logits.device != teacher_logits.device:
        _fail(ValueError, f"student_logits is on {student_logits.device} but teacher_logits is on "
                          f"{teacher_logits.device}")

    lead_shape = t_shape[:-1]
    flat_target = flat_checked_target(target, lead_shape, "teacher_logits", t_shape, teacher_logits.device,
                                      "the logits are")
    if flat_target is not None and check_targets:
        check_target_values(flat_target, vocab, options.ignore_index)

    return KDProblem(
        student=student_logits, teacher=teacher_logits, target=flat_target,
        multi_student=multi, lead_shape=lead_shape, ignore_index=options.ignore_index,
    )
