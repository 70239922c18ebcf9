"""Public loss API: :func:`kd_loss` and :class:`KDLoss`. The only place that picks a backend."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spacedkd_fast import backends
from spacedkd_fast.loss.args import canonicalize, check_target_values
from spacedkd_fast.loss.function import fused_kd_loss, fused_kd_loss_topk
from spacedkd_fast.loss.options import KDOptions, options_of
from spacedkd_fast.loss.reference import rows_reduced_reference
from spacedkd_fast.loss.sparse import SparseOptions, canonicalize_topk, check_index_values, topk_reduced_reference


def kd_loss(
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
    backend: str = "auto",
) -> Tensor:
    """Fused knowledge-distillation loss: ``(1−α)·CE_ε(s, y) + α·T²·KL(softmax(t/T) ‖ softmax(s/T))`` per row.

    The formula, its conventions and its edge cases (masked −inf logits, vocabulary mismatch, dtypes) are specified
    in :mod:`spacedkd_fast.loss.reference`.

    Args:
        student_logits: ``(..., V)`` logits, or ``(K, ..., V)`` for K students of one teacher (all K losses in one
            launch, the teacher read once: self-KD exits learning from the deepest exit). float32, bfloat16 or
            float16 (float64 runs on the reference, in float64); any strides, no forced copy. −inf masks a token
            (probability 0, outside the vocabulary of label smoothing).
        teacher_logits: ``(..., V)`` logits (``(..., Vt)`` with Vt > V under ``vocab_mismatch="truncate"``).
            Treated as detached unless ``teacher_grad=True``. −inf is teacher probability 0.
        target: ``(...)`` integer class indices with the teacher's leading shape, or None for the KL term
            alone (``loss = T²·KL``; α is not applied).
        temperature: T > 0, applied to student and teacher in the KL term; CE is at T = 1.
        alpha: weight of the KL term, in [0, 1].
        label_smoothing: ε in [0, 1) for the CE term.
        ignore_index: rows with this label contribute zero loss and zero gradient.
        reduction: "mean" (over non-ignored rows, no host sync), "sum", or "none" (per-row losses).
        t_squared: multiply the KL term by T² (Hinton et al.); False reproduces recipes that omit it (the official
            Spaced-KD self-KD code).
        teacher_grad: also give the teacher logits their gradient (mutual learning).
        vocab_mismatch: what a teacher vocabulary larger than the student's means: "error" (default) raises;
            "truncate" restricts the teacher to the student's ids ``0..V−1``, renormalized (the logits sliced
            ``[..., :V]`` as a view, no copy). A smaller teacher vocabulary always raises.
        backend: "auto" (Triton on CUDA, C++ on CPU, else torch), "triton", "cpp" or "torch" (the reference).
            With "auto", a Triton kernel that fails to compile on this machine falls back to the reference (one
            log line, once); an explicit "triton" raises instead.

    Returns:
        The loss, float32 (float64 when either logits tensor is float64): ``()`` for mean/sum (``(K,)`` with K
        students); ``(...)`` for none (``(K, ...)``). Gradients have the dtype of their input.

    Raises:
        TypeError / ValueError naming the argument, for bad shapes, dtypes, labels, vocabularies or
        hyperparameters.
    """
    options = options_of(temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad,
                         vocab_mismatch)
    return kd_loss_with(student_logits, teacher_logits, target, options, backend)


def kd_loss_with(student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None, options: KDOptions,
                 backend: str = "auto") -> Tensor:
    """:func:`kd_loss` with its options as one checked value (what :class:`KDLoss` and the engine call)."""
    problem = canonicalize(student_logits, teacher_logits, target, options, check_targets=False)
    # float64 anywhere routes "auto" to the reference; otherwise the kernels handle mixed dtypes themselves.
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_logits.dtype) else student_logits.dtype
    chosen = backends.select_loss_backend(backend, student_logits.device, dtype)
    if problem.target is not None and chosen != "cpp":  # the C++ kernel checks the labels in its own pass
        check_target_values(problem.target, problem.vocab, options.ignore_index)
    if chosen == "torch":
        return rows_reduced_reference(problem, options)  # float64 stays float64
    return fused_kd_loss(problem, options, backend=chosen, allow_fallback=backend == "auto")


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; takes the same keyword arguments and is called as
    ``loss_fn(student_logits, teacher_logits, target=None)``.

    Arguments are checked at construction, so a bad hyperparameter fails before training starts.
    """

    def __init__(
        self,
        *,
        temperature: float = 1.0,
        alpha: float = 0.5,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        t_squared: bool = True,
        teacher_grad: bool = False,
        vocab_mismatch: str = "error",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        # Checked now: a bad value fails before training.
        self.options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                                 ignore_index=ignore_index, reduction=reduction, t_squared=t_squared,
                                 teacher_grad=teacher_grad, vocab_mismatch=vocab_mismatch)
        backends.check_loss_backend(backend)
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss_with(student_logits, teacher_logits, target, self.options, self.backend)

    def extra_repr(self) -> str:
        fields = {f: getattr(self.options, f) for f in self.options.__dataclass_fields__}
        return ", ".join(f"{k}={v!r}" for k, v in {**fields, "backend": self.backend}.items())


# ---- top-k (sparse) teacher ----------------------------------------------------------------------------------
def kd_loss_topk(
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
    backend: str = "auto",
) -> Tensor:
    """:func:`kd_loss` against a sparse teacher: its top-k ``(indices, values)`` per row instead of a dense row.

    The objective, the tail policies and the limits are specified in :mod:`spacedkd_fast.loss.sparse`.

    Args:
        student_logits: ``(..., V)`` logits (the full row: CE and the student softmax use all of it).
        teacher_indices: ``(..., k)`` int64 or int32 token ids, distinct per row, in ``[0, V)``; 1 ≤ k ≤ 256.
        teacher_values: ``(..., k)`` float values at those ids: logits or log-probabilities (``values``). They get no
            gradient (offline targets).
        target: ``(...)`` labels, or None (the KL term alone).
        values: "logits" or "logprobs" (the teacher's full-distribution log-probabilities at T = 1).
        tail: the teacher's mass outside its top-k: "renormalize" (dropped; the top-k renormalized at T) or
            "bucket" (one extra outcome against the student's residual mass; needs ``values="logprobs"``).
        temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, backend: as for :func:`kd_loss`.

    Returns:
        The loss (float32, or float64 for float64 inputs): ``()`` for mean/sum, ``(...)`` for none. The student's
        gradient is dense, in its dtype. Under ``torch.compile`` the call is a graph break (it runs eagerly).
    """
    options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                        ignore_index=ignore_index, reduction=reduction, t_squared=t_squared)
    sparse = SparseOptions(tail=tail, values=values)
    return kd_loss_topk_with(student_logits, teacher_indices, teacher_values, target, options, sparse, backend)


def kd_loss_topk_with(student_logits: Tensor, teacher_indices: Tensor, teacher_values: Tensor,
                      target: Tensor | None, options: KDOptions, sparse: SparseOptions,
                      backend: str = "auto") -> Tensor:
    """:func:`kd_loss_topk` with its options as checked values (what :class:`KDLossTopK` calls)."""
    problem = canonicalize_topk(student_logits, teacher_indices, teacher_values, target, options,
                                check_values=False)
    dtype = torch.float64 if torch.float64 in (student_logits.dtype, teacher_values.dtype) else student_logits.dtype
    chosen = backends.select_loss_backend(backend, student_logits.device, dtype)
    # Duplicated ids are checked here for every backend; the C++ kernel checks labels and id ranges in its pass.
    if problem.target is not None and chosen != "cpp":
        check_target_values(problem.target, problem.vocab, options.ignore_index)
    check_index_values(problem.indices, problem.vocab, problem.valid_rows())
    if chosen == "torch":
        return topk_reduced_reference(problem, options, sparse)
    return fused_kd_loss_topk(problem, options, sparse, backend=chosen, allow_fallback=backend == "auto")


class KDLossTopK(nn.Module):
    """Module form of :func:`kd_loss_topk`, called as ``loss_fn(student_logits, teacher_indices, teacher_values,
    target=None)``; its arguments are checked at construction."""

    def __init__(
        self,
        *,
        values: str = "logits",
        tail: str = "renormalize",
        temperature: float = 1.0,
        alpha: float = 0.5,
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        reduction: str = "mean",
        t_squared: bool = True,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                                 ignore_index=ignore_index, reduction=reduction, t_squared=t_squared)
        self.sparse = SparseOptions(tail=tail, values=values)
        backends.check_loss_backend(backend)
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_indices: Tensor, teacher_values: Tensor,
                target: Tensor | None = None) -> Tensor:
        return kd_loss_topk_with(student_logits, teacher_indices, teacher_values, target, self.options, self.sparse,
                                 self.backend)

    def extra_repr(self) -> str:
        return (f"tail={self.sparse.tail!r}, values={self.sparse.values!r}, temperature={self.options.temperature}, "
                f"alpha={self.options.alpha}, reduction={self.options.reduction!r}, backend={self.backend!r}")
