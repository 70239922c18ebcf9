"""The options of a kd_loss call, as one frozen value checked once.

:class:`KDOptions` is built (and validated) where a call enters the package: :func:`~spacedkd_fast.kd_loss`, the
:class:`~spacedkd_fast.KDLoss` constructor, :func:`~spacedkd_fast.kd_loss_reference`, the engine's objectives.
From there it travels unchanged through argument canonicalization, the autograd function and the custom op to the
kernel launch, where it becomes the kernels' scalars (:meth:`KDOptions.weights`); nothing on the way checks a
hyperparameter again or recomputes T².
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from numbers import Real

REDUCTIONS = ("mean", "sum", "none")
# What a teacher with a larger vocabulary than the student's means (see spacedkd_fast/loss/reference.py).
VOCAB_MISMATCH = ("error", "truncate")


def _fail(exc_type: type[Exception], message: str):
    raise exc_type(f"kd_loss: {message}")


def _check_number(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        _fail(TypeError, f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= low if low_open else value < low
    above = value >= high if high_open else value > high
    if math.isnan(value) or below or above:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        _fail(ValueError, f"{name} must be in {interval}, got {value!r}")
    return value


@dataclass(frozen=True)
class KDOptions:
    """``(1−α)·CE_ε(s, y) + α·c·KL(softmax(t/T) ‖ softmax(s/T))`` with c = T² (or 1), per row, then reduced.

    Attributes:
        temperature: T, finite and > 0 (the KL term; CE is at T = 1).
        alpha: α in [0, 1], the weight of the KL term.
        label_smoothing: ε in [0, 1) for the CE term.
        ignore_index: rows with this label contribute nothing.
        reduction: "mean" (over non-ignored rows), "sum" or "none".
        t_squared: c = T² (Hinton et al.); False: c = 1.
        teacher_grad: the teacher logits get their gradient too (mutual learning).
        vocab_mismatch: a teacher vocabulary larger than the student's: "error" (the default) raises;
            "truncate" restricts the teacher to the student's ids (the logits sliced ``t[..., :Vs]``, a view), which
            renormalizes its distribution over them. Applied by argument canonicalization, before any kernel.
    """

    temperature: float = 1.0
    alpha: float = 0.5
    label_smoothing: float = 0.0
    ignore_index: int = -100
    reduction: str = "mean"
    t_squared: bool = True
    teacher_grad: bool = False
    vocab_mismatch: str = "error"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalized once
        set_("temperature", _check_number("temperature", self.temperature, 0.0, math.inf, low_open=True,
                                          high_open=True))
        set_("alpha", _check_number("alpha", self.alpha, 0.0, 1.0, low_open=False, high_open=False))
        set_("label_smoothing", _check_number("label_smoothing", self.label_smoothing, 0.0, 1.0, low_open=False,
                                              high_open=True))
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            _fail(TypeError, f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if self.reduction not in REDUCTIONS:
            _fail(ValueError, f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.vocab_mismatch not in VOCAB_MISMATCH:
            _fail(ValueError, f"vocab_mismatch must be one of {VOCAB_MISMATCH}, got {self.vocab_mismatch!r}")
        for name in ("t_squared", "teacher_grad"):
            if not isinstance(getattr(self, name), bool):
                _fail(TypeError, f"{name} must be a bool, got {type(getattr(self, name)).__name__}")

    @classmethod
    def trusted(cls, **fields) -> KDOptions:
        """Options rebuilt from fields already checked (inside the custom op, from its scalar arguments)."""
        options = object.__new__(cls)
        for f in dataclasses.fields(cls):
            object.__setattr__(options, f.name, fields.get(f.name, f.default))
        return options

    @property
    def kd_scale(self) -> float:
        """c: T² or 1."""
        return self.temperature * self.temperature if self.t_squared else 1.0

    def weights(self, has_target: bool) -> tuple[float, float]:
        """``(ce_weight, kd_weight)`` of a row: ``(1 − α, α·c)`` with a target, ``(0, c)`` without (the KL term
        alone; α is not applied)."""
        if not has_target:
            return 0.0, self.kd_scale
        return 1.0 - self.alpha, self.alpha * self.kd_scale

    def replace(self, **changes) -> KDOptions:
        return dataclasses.replace(self, **changes)


@functools.lru_cache(maxsize=64, typed=True)
def _cached_options(*fields) -> KDOptions:
    return KDOptions(*fields)


def options_of(temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad,
               vocab_mismatch) -> KDOptions:
    """``KDOptions(...)`` of a call's keyword arguments, checked once per distinct set of values: a loop calling
    ``kd_loss`` with the same hyperparameters every step gets the checked value back (~0.5 µs, against ~4 µs to
    check them again). ``typed``: ``alpha=True`` is not ``alpha=1`` (the check refuses the bool); arguments that
    cannot be hashed (a tensor temperature) are checked directly, and refused with the usual message."""
    fields = (temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad, vocab_mismatch)
    try:
        return _cached_options(*fields)
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return KDOptions(*fields)
