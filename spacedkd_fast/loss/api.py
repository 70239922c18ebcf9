"""Public loss API: :func:`kd_loss` and :class:`KDLoss`. The only place that picks a backend."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from spacedkd_fast import backends
from spacedkd_fast.loss.args import canonicalize, check_target_values
from spacedkd_fast.loss.function import fused_kd_loss
from spacedkd_fast.loss.options import KDOptions, options_of
from spacedkd_fast.loss.reference import rows_reduced_reference


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
        if backend not in backends.LOSS_BACKENDS:
            raise ValueError(f"kd_loss: backend must be one of {backends.LOSS_BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, target: Tensor | None = None) -> Tensor:
        return kd_loss_with(student_logits, teacher_logits, target, self.options, self.backend)

    def extra_repr(self) -> str:
        fields = {f: getattr(self.options, f) for f in self.options.__dataclass_fields__}
        return ", ".join(f"{k}={v!r}" for k, v in {**fields, "backend": self.backend}.items())
