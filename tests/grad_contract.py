"""The gradient-accuracy contract: its cases, its metric and its tolerances, shared by ``tests/test_grad_contract.py``
(which asserts them) and ``bench/grad_contract.py`` (which prints the table the README publishes).

Every case is run by a backend on inputs of one dtype (float32, bfloat16, float16: the kernels accumulate in
float32) and by the float64 reference on the *same values* upcast exactly, so the error measured is the backend's
alone, not the rounding of the inputs. The metric, per output::

    error = max |x − x64| / max |x64|        (0 when both are exactly 0)

over the loss (a scalar or per-row losses), the student gradient and the teacher gradient (``teacher_grad=True``).
Normalizing by the largest reference value, not elementwise, is what makes bfloat16 meaningful: a gradient entry
1e-6 of the largest is stored with 8 significant bits like every other, so its own relative error says nothing
about the update.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from spacedkd_fast import kd_loss, kd_loss_reference

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TEMPERATURES = (1.0, 4.0)
N, V = 64, 512
NEG_INF = float("-inf")

# Tolerances of the contract per input dtype, set from the measured errors (bench/grad_contract.py) with a margin;
# the targets are bfloat16 gradients within 1e-2 and the loss within 1e-3.
# * The loss is computed in float32 from the inputs as they are, whatever their dtype. Its worst case is the
#   confident rows: a CE of ~1e-4 is log(Z) with Z = 1 + 1e-4, resolved to float32's 6e-8 (1e-4 relative at worst).
# * A gradient carries float32's absolute resolution near 1 (where p_y ≥ 0.999, p_y − 1 ≈ −1e-3 is known to ~1e-7:
#   1e-3 relative, as in PyTorch's own float32 cross_entropy) and the teacher's fp32 logit differences (teacher ≈
#   student), then its own dtype's rounding when stored: 2^-9 for bfloat16, 2^-12 for float16.
# * float16 gradients below 2^-14 are subnormal: stored to 2^-24 absolute, whatever their size (GRAD_FLOOR). The
#   kernels write the gradient in the forward, before any loss scale is known, so GradScaler does not lift them.
LOSS_TOL = {torch.float32: 2e-4, torch.bfloat16: 2e-4, torch.float16: 2e-4}
GRAD_TOL = {torch.float32: 2e-3, torch.bfloat16: 1e-2, torch.float16: 3e-3}
GRAD_FLOOR = {torch.float32: 0.0, torch.bfloat16: 0.0, torch.float16: 2.0**-24}


@dataclass(frozen=True)
class Case:
    """One contract case: ``build(dtype, temperature, generator) -> (student, teacher, target, options)``."""

    name: str
    description: str
    build: Callable
    split_at: int | None = None  # the loss as the sum of two calls, on the (flattened) rows before and after this


def _randn(*shape, generator, scale=3.0):
    return torch.randn(*shape, generator=generator, dtype=torch.float64) * scale


def _labels(n, v, generator, ignore_every=5):
    y = torch.randint(0, v, (n,), generator=generator)
    if ignore_every:
        y[::ignore_every] = -100
    return y


def _options(temperature, **changes):
    return {"temperature": temperature, "alpha": 0.5, "label_smoothing": 0.1, "reduction": "mean", **changes}


def _random(dtype, temperature, g):
    return (_randn(N, V, generator=g).to(dtype), _randn(N, V, generator=g).to(dtype), _labels(N, V, g),
            _options(temperature))


def _confident(dtype, temperature, g):
    """Student and teacher put p ≥ 0.999 on the label (the student's checked after rounding to ``dtype``)."""
    y = torch.randint(0, V, (N,), generator=g)
    s = _randn(N, V, generator=g, scale=1.0)
    t = _randn(N, V, generator=g, scale=1.0)
    s[torch.arange(N), y] += 16.0
    t[torch.arange(N), y] += 14.0
    s, t = s.to(dtype), t.to(dtype)
    p_y = torch.softmax(s.double(), dim=-1)[torch.arange(N), y]
    assert p_y.min() >= 0.999, p_y.min()
    y[::5] = -100
    return s, t, y, _options(temperature, label_smoothing=0.0)


def _teacher_close(dtype, temperature, g):
    """The teacher equals the student up to 1e-3 noise (before rounding to ``dtype``): KL ≈ 0, gradient ≈ CE's."""
    s = _randn(N, V, generator=g)
    t = s + _randn(N, V, generator=g, scale=1e-3)
    return s.to(dtype), t.to(dtype), _labels(N, V, g), _options(temperature)


def _masked(dtype, temperature, g):
    """30% of each row masked (−inf) in student and teacher, 10% more in the teacher only."""
    s, t = _randn(N, V, generator=g), _randn(N, V, generator=g)
    both = torch.rand(N, V, generator=g) < 0.3
    teacher_only = (torch.rand(N, V, generator=g) < 0.1) & ~both
    y = torch.where(both, -1.0, torch.rand(N, V, generator=g)).argmax(dim=-1)  # labels on unmasked tokens
    y[::5] = -100
    s = s.masked_fill(both, NEG_INF)
    t = t.masked_fill(both | teacher_only, NEG_INF)
    return s.to(dtype), t.to(dtype), y, _options(temperature)


def _all_ignored(dtype, temperature, g):
    s, t = _randn(N, V, generator=g), _randn(N, V, generator=g)
    return s.to(dtype), t.to(dtype), torch.full((N,), -100), _options(temperature)


def _padded_sequences(dtype, temperature, g):
    """(B, T, V) next-token logits, the time-shifted view ``[:, :-1]`` as models give them: sequences 1 and 3 are
    all padding (ignored), the others end with padding."""
    b, length = 4, N // 4
    s = _randn(b, length + 1, V, generator=g).to(dtype)[:, :-1]
    t = _randn(b, length + 1, V, generator=g).to(dtype)[:, :-1]
    y = torch.randint(0, V, (b, length), generator=g)
    y[1] = -100
    y[3] = -100
    y[0, 12:] = -100
    y[2, 5:] = -100
    return s, t, y, _options(temperature)


def _halves(dtype, temperature, g):
    s, t, y, options = _padded_sequences(dtype, temperature, g)
    return s, t, y, {**options, "reduction": "sum"}


CASES = [
    Case("random", "random logits (σ = 3), 20% of rows ignored, ε = 0.1", _random),
    Case("confident", "p_y ≥ 0.999 in student and teacher", _confident),
    Case("teacher≈student", "teacher = student + 1e-3 noise", _teacher_close),
    Case("masked", "30% −inf in both, 10% more in the teacher", _masked),
    Case("all ignored", "every label ignore_index (loss and gradients exactly 0)", _all_ignored),
    Case("padded sequences", "(4, 16, V) time-shifted views, 2 sequences all padding", _padded_sequences),
    Case("split rows summed", "reduction='sum' of two calls split at row 37 (inside sequence 2) vs one call",
         _halves, split_at=N // 2 + 5),
]


def errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """``(max|x − ref|, max|ref|)`` over the finite reference values; ``(inf, ·)`` when ``x`` is not finite exactly
    where ``ref`` is not, or differs from it there."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(ref)
    if not torch.equal(torch.isfinite(x), finite) or not torch.equal(x[~finite], ref[~finite]):
        return math.inf, 0.0
    if not finite.any():
        return 0.0, 0.0
    return (x[finite] - ref[finite]).abs().max().item(), ref[finite].abs().max().item()


def relative(err: float, scale: float) -> float:
    """The contract's metric ``max|x − x64| / max|x64|``: 0 when both are 0, inf when only the error is not."""
    if scale == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / scale


def within(measured: dict, dtype: torch.dtype) -> bool:
    """Whether one measurement (:func:`measure`) meets the contract: every output finite where the reference is,
    the loss within ``LOSS_TOL`` and each gradient within ``GRAD_TOL`` of its largest reference value (plus the
    float16 subnormal floor)."""
    if not measured["finite"]:
        return False
    err, scale = measured["abs"]["loss"]
    if err > LOSS_TOL[dtype] * scale:
        return False
    return all(measured["abs"][k][0] <= GRAD_TOL[dtype] * measured["abs"][k][1] + GRAD_FLOOR[dtype]
               for k in ("grad_student", "grad_teacher"))


def _run(fn, student, teacher, target, options, split_at=None):
    """Loss and gradients of ``fn`` (kd_loss or the reference); with ``split_at`` the loss is the sum of two calls,
    on the rows before and after that flattened row."""
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(True)
    if split_at is not None:
        sf, tf, yf = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), target.reshape(-1)
        loss = fn(sf[:split_at], tf[:split_at], yf[:split_at], **options) + fn(
            sf[split_at:], tf[split_at:], yf[split_at:], **options)
    else:
        loss = fn(s, t, target, **options)
    loss.sum().backward()
    return loss, s.grad, t.grad


def measure(case: Case, backend: str, dtype: torch.dtype, temperature: float, seed: int = 0) -> dict:
    """The errors of ``backend`` on ``case`` against the float64 reference on the same input values.

    Returns ``{"loss": e, "grad_student": e, "grad_teacher": e}`` (the metric), ``"abs"``: the same keys with
    ``(max|x − x64|, max|x64|)``, and ``"finite"``: the backend's loss and gradients are finite everywhere the
    reference's are, and equal to it where they are not.
    """
    g = torch.Generator().manual_seed(seed)
    student, teacher, target, options = case.build(dtype, temperature, g)
    options = {**options, "teacher_grad": True}
    loss, g_s, g_t = _run(lambda *a, **o: kd_loss(*a, backend=backend, **o), student, teacher, target, options,
                          case.split_at)
    # The reference is the whole problem in one float64 call: the two parts must add up to it.
    ref, r_s, r_t = _run(kd_loss_reference, student.double(), teacher.double(), target, options)
    assert g_s.dtype == dtype and g_t.dtype == dtype and loss.dtype == torch.float32
    absolute = {"loss": errors(loss, ref), "grad_student": errors(g_s, r_s), "grad_teacher": errors(g_t, r_t)}
    measured = {k: relative(*v) for k, v in absolute.items()}
    measured["abs"] = absolute
    measured["finite"] = all(math.isfinite(e) for e, _ in absolute.values())
    return measured
