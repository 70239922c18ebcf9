"""kd_loss with a sparse (top-k) teacher: **the spec**, and its argument checks.

Offline distillation stores, per token, the teacher's top-k ``(indices, values)`` instead of its whole row: k·(4 + 2)
bytes (int32 ids, bf16 values) instead of 2·V. Per row ``i`` with student logits ``s`` (the full row, ``V``
columns), the teacher's ids ``K = {j_1..j_k}`` (distinct, in ``[0, V)``) and values ``v_1..v_k``, label ``y``::

    loss_i = (1 − α) · CE_ε(s, y) + α · c · KL_K(p ‖ q),        c = T² (or 1: t_squared=False)

CE_ε, α, T, ε, ``ignore_index``, the reductions, ``target=None`` and the −inf (masked) student tokens mean exactly
what they mean for the dense :func:`spacedkd_fast.kd_loss` (see :mod:`spacedkd_fast.loss.reference`). The student
side of the KL is always the student's **full-vocabulary** softmax at T, ``q = softmax(s/T)``. What the teacher's
mass outside its top-k becomes is the ``tail`` policy:

* ``tail="renormalize"`` (default): the teacher is restricted to its top-k and renormalized at T,
  ``p_j = softmax(v/T)_j`` over the k entries, and ``KL_K = Σ_{j∈K} p_j (log p_j − log q_j)``. It is exactly the
  dense loss with a teacher row that is ``v`` at K and −inf elsewhere (a teacher −inf is probability 0), which is
  how the tests check it. The values may be logits or log-probabilities (``values="logits"|"logprobs"``): a
  log-probability is a logit minus the row's log-normalizer, a shift that the renormalization removes, so both give
  the same loss. The student's mass outside K is not compared with anything: its gradient there is
  ``(α·c/T)·q_j`` (pushed down, as a dense teacher with probability 0 there would).
* ``tail="bucket"``: the teacher's residual mass is one extra outcome, compared with the student's residual mass.
  The values must be the **log-probabilities of the teacher's full distribution at T = 1**
  (``values="logprobs"``, e.g. ``log_softmax(t).topk(k)``), since with logits the residual mass is unknown
  (``values="logits"`` raises). With ``P_j = exp(v_j)`` and ``P_tail = 1 − Σ_K P_j`` (0 when that is ≤ 0, and 0
  when k = V)::

        p = softmax([v_1, …, v_k, log P_tail] / T)                    the teacher as k + 1 outcomes, tempered
        q_tail = 1 − Σ_K q_j = Σ_{j∉K} softmax(s/T)_j                  the student's residual mass at T (exact)
        KL_K = Σ_{j∈K} p_j (log p_j − log q_j) + p_tail (log p_tail − log q_tail)

  At T = 1 this is the exact KL between the two distributions coarsened to K ∪ {rest}. At T ≠ 1 the teacher's
  tempered tail cannot be known from k values (it depends on how the residual mass is spread); the policy tempers
  the residual as **one** outcome of log-probability ``log P_tail``, which for T > 1 gives the tail less mass than
  the true tempered teacher would (many small probabilities are flattened up by T, one lump much less). It is a
  modelling choice, documented rather than hidden; for the exact tempered tail, store ``log_softmax(t/T)`` and use
  T = 1 on it (the student is then compared at T = 1 too). The student gradient outside K is
  ``(α·c/T)·q_j·(1 − p_tail/q_tail)``: the teacher's tail mass is spread over the student's tail in proportion to
  the student's own probabilities.

Rules shared by both policies:

* A teacher value of −inf is teacher probability 0 (use it to pad rows with fewer than k candidates; the padded
  ids must still be distinct). A teacher row whose k values are all −inf has no distribution: NaN, unless ignored.
* Teacher mass on a token the student masks (student −inf) gives KL = +inf, as in the dense loss; under "bucket"
  so does a positive ``P_tail`` when the student has no mass outside K.
* The teacher values get no gradient (offline targets); the student gets its dense ``(…, V)`` gradient.
* dtypes: float64 student or values compute in float64 (loss and gradient float64); otherwise in float32, the loss
  float32 and the student gradient in the student's dtype.
* Limits: ``1 ≤ k ≤ min(V, 256)`` (``MAX_TOPK``: what one kernel program holds in registers beside its column
  block). One student per teacher (no K-students form).

Bad input raises before any work, naming the argument: indices out of ``[0, V)`` or duplicated within a row (checked
on the rows that are not ignored; always on CPU, on CUDA only with ``SPACEDKD_CHECK_TARGETS=1`` since it costs a
host sync, like the labels: unchecked, an out-of-range id gives that row a NaN loss on the Triton kernel, and a
duplicated one a wrong value), k > V or k > 256, indices and values of different shapes, a leading shape that is not
the student's, integer or boolean values, floating-point indices, tensors on different devices.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from spacedkd_fast.loss.args import FLOAT_DTYPES, _check_logits, check_target_values, flat_checked_target
from spacedkd_fast.loss.options import KDOptions, _fail
from spacedkd_fast.loss.reference import ce_reference

MAX_TOPK = 256
TAILS = ("renormalize", "bucket")
VALUE_KINDS = ("logits", "logprobs")
INDEX_DTYPES = (torch.int64, torch.int32)

__all__ = ["MAX_TOPK", "TAILS", "VALUE_KINDS", "SparseOptions", "TopKProblem", "canonicalize_topk",
           "check_index_values", "kd_loss_topk_reference", "topk_rows_reference", "topk_reduced_reference"]


@dataclass(frozen=True)
class SparseOptions:
    """What a top-k teacher's values are and what its mass outside the top-k becomes (see the module docstring).

    Attributes:
        tail: "renormalize" or "bucket".
        values: "logits" or "logprobs" (log-probabilities of the full distribution at T = 1); "bucket" needs them.
    """

    tail: str = "renormalize"
    values: str = "logits"

    def __post_init__(self) -> None:
        if self.tail not in TAILS:
            _fail(ValueError, f"tail must be one of {TAILS}, got {self.tail!r}")
        if self.values not in VALUE_KINDS:
            _fail(ValueError, f"teacher values must be one of {VALUE_KINDS}, got {self.values!r}")
        if self.tail == "bucket" and self.values != "logprobs":
            _fail(ValueError, "tail='bucket' needs values='logprobs' (the teacher's log-probabilities at T = 1): "
                              "the mass outside the top-k of logits is unknown")

    @property
    def bucket(self) -> bool:
        return self.tail == "bucket"


@dataclass(frozen=True)
class TopKProblem:
    """A checked kd_loss_topk call: the student ``(..., V)``, the flattened ``(N, k)`` indices and values, the
    ``(N,)`` target or None, and the leading shape."""

    student: Tensor
    indices: Tensor
    values: Tensor
    target: Tensor | None
    lead_shape: tuple[int, ...]
    ignore_index: int

    @property
    def num_rows(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def vocab(self) -> int:
        return self.student.shape[-1]

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    def student_rows(self) -> Tensor:
        return self.student.reshape(self.num_rows, self.vocab)

    def valid_rows(self) -> Tensor | None:
        return None if self.target is None else self.target != self.ignore_index

    def valid_count(self, dtype: torch.dtype) -> Tensor:
        if self.target is None:
            return torch.tensor(self.num_rows, dtype=dtype, device=self.student.device)
        return (self.target != self.ignore_index).sum().to(dtype)


def check_index_values(indices: Tensor, vocab: int, valid: Tensor | None) -> None:
    """Raise if a (non-ignored) row's top-k indices leave ``[0, V)`` or repeat. On CUDA only with
    ``SPACEDKD_CHECK_TARGETS=1`` (a host sync)."""
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return
    if indices.device.type != "cpu" and os.environ.get("SPACEDKD_CHECK_TARGETS", "0") != "1":
        return
    rows = indices if valid is None else indices[valid]
    bad = (rows < 0) | (rows >= vocab)
    if bool(bad.any()):
        values = rows[bad][:5].tolist()
        _fail(ValueError, f"teacher_indices holds ids outside [0, {vocab}): {values}"
                          f"{' ...' if int(bad.sum()) > 5 else ''}")
    if rows.shape[-1] > 1:
        ordered = rows.sort(dim=-1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=-1)
        if bool(repeated.any()):
            where = torch.nonzero(repeated)[:5, 0].tolist()
            _fail(ValueError, f"teacher_indices repeats an id within a row (rows {where} of the flattened "
                              f"non-ignored rows); the top-k ids of a row must be distinct (pad with distinct ids "
                              f"and value -inf)")


def canonicalize_topk(student_logits, teacher_indices, teacher_values, target, options: KDOptions, *,
                      check_values: bool = True) -> TopKProblem:
    """Check a kd_loss_topk call (``options`` already checked) and return its canonical problem.

    ``check_values=False`` leaves the label and index *values* to the caller (the C++ kernel counts labels itself).
    """
    _check_logits("student_logits", student_logits)
    if not isinstance(teacher_indices, Tensor):
        _fail(TypeError, f"teacher_indices must be a torch.Tensor, got {type(teacher_indices).__name__}")
    if not isinstance(teacher_values, Tensor):
        _fail(TypeError, f"teacher_values must be a torch.Tensor, got {type(teacher_values).__name__}")
    if teacher_indices.dtype not in INDEX_DTYPES:
        _fail(TypeError, f"teacher_indices must be an int64 or int32 tensor, got dtype {teacher_indices.dtype}")
    if teacher_values.dtype not in FLOAT_DTYPES:
        _fail(TypeError, f"teacher_values must be a floating-point tensor (float32, bfloat16, float16 or float64), "
                         f"got dtype {teacher_values.dtype}")
    i_shape, v_shape, s_shape = (tuple(x.shape) for x in (teacher_indices, teacher_values, student_logits))
    if i_shape != v_shape:
        _fail(ValueError, f"teacher_indices shape {i_shape} does not match teacher_values shape {v_shape}")
    if len(i_shape) == 0:
        _fail(ValueError, "teacher_indices must have a top-k dimension, shape (..., k); got a 0-dim tensor")
    if i_shape[:-1] != s_shape[:-1]:
        _fail(ValueError, f"teacher_indices shape {i_shape} does not match student_logits shape {s_shape}: "
                          f"expected the student's leading shape {s_shape[:-1]} followed by k")
    vocab, k = s_shape[-1], i_shape[-1]
    if vocab == 0:
        _fail(ValueError, f"the vocabulary dimension (last) of student_logits is 0: {s_shape}")
    if k == 0:
        _fail(ValueError, f"teacher_indices has k = 0 entries per row ({i_shape}); k must be >= 1")
    if k > vocab:
        _fail(ValueError, f"teacher_indices has k = {k} entries per row, more than the vocabulary V = {vocab}")
    if k > MAX_TOPK:
        _fail(ValueError, f"teacher_indices has k = {k} entries per row; at most {MAX_TOPK} are supported")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_values", teacher_values)):
        if x.device != student_logits.device:
            _fail(ValueError, f"{name} is on {x.device} but student_logits is on {student_logits.device}")
    lead_shape = s_shape[:-1]
    flat_target = flat_checked_target(target, lead_shape, "student_logits", s_shape, student_logits.device,
                                      "student_logits is")
    n = math.prod(lead_shape)
    problem = TopKProblem(student=student_logits, indices=teacher_indices.reshape(n, k),
                          values=teacher_values.reshape(n, k), target=flat_target, lead_shape=lead_shape,
                          ignore_index=options.ignore_index)
    if check_values:
        if flat_target is not None:
            check_target_values(flat_target, vocab, options.ignore_index)
        check_index_values(problem.indices, vocab, problem.valid_rows())
    return problem


# ---- the math ------------------------------------------------------------------------------------------------
def _safe_logsumexp(x: Tensor) -> Tensor:
    """logsumexp over the last dim; −inf (with a zero gradient, never NaN) for rows that are all −inf."""
    empty = (x == float("-inf")).all(dim=-1, keepdim=True)
    out = torch.logsumexp(torch.where(empty, torch.zeros_like(x), x), dim=-1, keepdim=True)
    return torch.where(empty, float("-inf"), out).squeeze(-1)


def topk_kl_reference(s: Tensor, indices: Tensor, values: Tensor, temperature: float,
                      sparse: SparseOptions) -> Tensor:
    """``KL_K(p ‖ q)`` per row (the module docstring's definition).

    Args:
        s: ``(N, V)`` student logits in the compute dtype; indices ``(N, k)`` int64 in ``[0, V)``, distinct per row;
        values ``(N, k)`` in the compute dtype.
    """
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    log_q = F.log_softmax(s / temperature, dim=-1)  # (N, V) the student's full softmax at T
    log_q_k = log_q.gather(-1, indices)  # (N, k)
    teacher = values
    vocab, k = s.shape[-1], indices.shape[-1]
    bucket = sparse.bucket and k < vocab
    if bucket:
        # P_tail = 1 − Σ_K exp(v) at T = 1, accurately near 0 (−expm1), 0 where the k entries hold it all.
        lse_v = _safe_logsumexp(values)
        tail = torch.where(lse_v < 0, -torch.expm1(torch.clamp(lse_v, max=0.0)), zero)
        log_tail = torch.where(tail > 0, torch.log(torch.where(tail > 0, tail, 1.0)), float("-inf"))
        teacher = torch.cat([values, log_tail[:, None]], dim=-1)
        # log q_tail = lse over the tokens outside K, minus the full lse, at T.
        outside = (s / temperature).scatter(-1, indices, float("-inf"))
        log_q_tail = _safe_logsumexp(outside) - torch.logsumexp(s / temperature, dim=-1)
        log_q_k = torch.cat([log_q_k, log_q_tail[:, None]], dim=-1)
    log_p = F.log_softmax(teacher / temperature, dim=-1)  # (N, k) or (N, k + 1)
    p = log_p.exp()
    # Zero teacher mass contributes 0 (also against a student −inf); masked before the product, as in the dense spec.
    return (p * torch.where(p == 0, zero, log_p - log_q_k)).sum(dim=-1)


def topk_rows_reference(student: Tensor, indices: Tensor, values: Tensor, target: Tensor | None,
                        options: KDOptions, sparse: SparseOptions) -> Tensor:
    """Per-row losses ``(N,)`` of ``(N, V)`` student rows against ``(N, k)`` top-k teachers: float64 when the student
    or the values are float64, float32 otherwise. Gradients flow to ``student`` (detach the values yourself)."""
    compute_dtype = torch.float64 if torch.float64 in (student.dtype, values.dtype) else torch.float32
    s = student.to(compute_dtype)
    v = values.to(compute_dtype)
    idx = indices.long()
    zero = torch.zeros((), dtype=compute_dtype, device=s.device)
    valid = None
    if target is not None:
        valid = target != options.ignore_index
        # Ignored rows: zeroed logits and values, and ids 0..k−1, so nothing there (garbage ids, NaN) is read.
        s = torch.where(valid[:, None], s, zero)
        v = torch.where(valid[:, None], v, zero)
        idx = torch.where(valid[:, None], idx, torch.arange(idx.shape[-1], device=idx.device))
    kl = topk_kl_reference(s, idx, v, options.temperature, sparse)
    ce_weight, kd_weight = options.weights(target is not None)
    if target is None:
        return kd_weight * kl
    kl = torch.where(valid, kl, zero)
    if ce_weight == 0.0:  # a term of weight 0 is left out (an infinite one would give NaN), as in the dense spec
        return kd_weight * kl
    ce = torch.where(valid, ce_reference(s, target, valid, options.label_smoothing), zero)
    if kd_weight == 0.0:
        return ce_weight * ce
    return ce_weight * ce + kd_weight * kl


def reduce_topk_rows(rows: Tensor, problem: TopKProblem, reduction: str) -> Tensor:
    if reduction == "none":
        return rows.reshape(problem.lead_shape)
    total = rows.sum()
    if reduction == "mean":
        total = total / problem.valid_count(rows.dtype).clamp_min(1)
    return total


def topk_reduced_reference(problem: TopKProblem, options: KDOptions, sparse: SparseOptions) -> Tensor:
    """The reference loss of a checked problem in its public shape (the "torch" backend of kd_loss_topk)."""
    rows = topk_rows_reference(problem.student_rows(), problem.indices, problem.values.detach(), problem.target,
                               options, sparse)
    return reduce_topk_rows(rows, problem, options.reduction)


def kd_loss_topk_reference(
    student_logits: Tensor,
    teacher_indices: Tensor,
    teacher_values: Tensor,
    target: Tensor | None = None,
    *,
    values: str = "logits",
    tail: str = "renormalize",
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    t_squared: bool = True,
) -> Tensor:
    """The spec, with the public signature of :func:`spacedkd_fast.kd_loss_topk` (minus ``backend``)."""
    options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                        ignore_index=ignore_index, reduction=reduction, t_squared=t_squared)
    sparse = SparseOptions(tail=tail, values=values)
    problem = canonicalize_topk(student_logits, teacher_indices, teacher_values, target, options)
    return topk_reduced_reference(problem, options, sparse)
