"""Masked vocabulary (−inf logits) on every backend and dtype: the semantics of ``spacedkd_fast.loss.reference``.

A masked token is −inf in the *student*; a teacher −inf is probability 0. Masked in both (or in the teacher only):
finite loss, equal to the float64 reference, gradient exactly 0 on masked tokens. Teacher mass on a masked token,
or a label on one: +inf loss (never NaN), finite gradients equal to the reference. A row with every student logit
−inf: NaN unless ignored. The Triton cases run with ``TRITON_INTERPRET=1 pytest -m triton`` (``small_blocks``
streams the rows through 64-column blocks, one of which is entirely masked).
"""

import pytest
import torch
from helpers import DEVICE, GRAD_TOL, LOSS_BACKENDS, LOSS_TOL, assert_close, check_against_reference, make_logits

from spacedkd_fast import kd_loss, kd_loss_reference
from spacedkd_fast.kernels import launch

BACKENDS = LOSS_BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")
N, V = 12, 300


@pytest.fixture(params=["default_blocks", "small_blocks"])
def block_size(request, monkeypatch):
    """The Triton column block: the default (one block per row) or 64 (five streamed blocks)."""
    if request.param == "small_blocks":
        monkeypatch.setattr(launch, "MAX_BLOCK_V", 64)
    return request.param


def _mask(n=N, v=V, fraction=0.3, seed=0):
    """A (n, v) bool mask: ~30% of every row, all of row 0's second 64-column block, never column 0."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, v, generator=g) < fraction
    mask[0, 64:128] = True
    mask[:, 0] = False
    return mask.to(DEVICE)


def _labels(mask, ignore_every=5):
    """A label per row on an unmasked token (every ``ignore_every``-th row ignored)."""
    scores = torch.rand(mask.shape, device=mask.device).masked_fill(mask, -1.0)
    y = scores.argmax(dim=-1)
    y[::ignore_every] = -100
    return y


def masked_inputs(where, dtype=torch.float32, n=N, v=V, k=None):
    """``(student, teacher, target)`` with −inf where ``where`` says: "both" (the same tokens), "teacher" (teacher
    only), or "student_in_teacher" (the student masks a subset of the teacher's −inf tokens)."""
    mask = _mask(n, v)
    s = make_logits(*((k, n, v) if k else (n, v)), dtype=dtype)
    t = make_logits(n, v, dtype=dtype)
    if where in ("both", "student_in_teacher"):
        t = t.masked_fill(mask, NEG_INF)
        s_mask = mask if where == "both" else mask & (torch.rand(n, v, device=DEVICE) < 0.5)
        s = s.masked_fill(s_mask, NEG_INF)
    elif where == "teacher":
        t = t.masked_fill(mask, NEG_INF)
    else:
        raise ValueError(where)
    return s, t, _labels(mask)


# ---- finite cases: equal to the reference, zero gradient on masked tokens ------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("where", ["both", "teacher", "student_in_teacher"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_tokens_match_reference(backend, dtype, where, label_smoothing):
    s, t, y = masked_inputs(where, dtype)
    out, ref = check_against_reference(s, t, y, backend=backend, teacher_grad=True, temperature=2.0, alpha=0.4,
                                       label_smoothing=label_smoothing, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("students", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_gradient_is_exactly_zero(backend, students, temperature, block_size):
    s, t, y = masked_inputs("both", k=students)
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = kd_loss(s, t, y, backend=backend, temperature=temperature, alpha=0.6, label_smoothing=0.2,
                  teacher_grad=True)
    out.sum().backward()
    mask = torch.isinf(s.detach())
    assert torch.isfinite(out).all()
    assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()
    assert (s.grad[mask] == 0).all(), "a masked student token must get no gradient"
    assert (t.grad[torch.isinf(t.detach())] == 0).all(), "a zero-probability teacher token must get no gradient"
    ref = kd_loss_reference(s.detach().double(), t.detach().double(), y, temperature=temperature, alpha=0.6,
                            label_smoothing=0.2)
    assert_close(out, ref, *LOSS_TOL[torch.float32], "loss")


@pytest.mark.triton
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_triton_masked_blocks(block_size, label_smoothing):
    """The streamed (multi-block) path with a fully masked block, against the reference."""
    s, t, y = masked_inputs("both")
    check_against_reference(s, t, y, backend="triton", teacher_grad=True, temperature=3.0, alpha=0.5,
                            label_smoothing=label_smoothing, reduction="none")


def test_reference_masked_tokens_are_removed_columns():
    """The spec: a token masked in student and teacher is as if its column were not there (smoothing included)."""
    n, v = 9, 40
    s = torch.randn(n, v, dtype=torch.float64) * 2
    t = torch.randn(n, v, dtype=torch.float64) * 2
    y = torch.randint(0, 30, (n,))
    y[3] = -100
    keep = torch.arange(v) < 30
    s_masked, t_masked = s.clone(), t.clone()
    s_masked[:, ~keep] = NEG_INF
    t_masked[:, ~keep] = NEG_INF
    options = dict(temperature=2.5, alpha=0.3, label_smoothing=0.15, reduction="none")
    masked = kd_loss_reference(s_masked, t_masked, y, **options)
    removed = kd_loss_reference(s[:, keep], t[:, keep], y, **options)
    torch.testing.assert_close(masked, removed, rtol=1e-12, atol=1e-12)


# ---- +inf, never NaN ------------------------------------------------------------------------------------------

def _student_masks_teacher_mass(dtype):
    """Rows 1 and 4 mask tokens where the teacher has mass; the other rows are finite."""
    s, t = make_logits(N, V, dtype=dtype), make_logits(N, V, dtype=dtype)
    s[1, 10:20] = NEG_INF
    s[4, 200] = NEG_INF
    y = torch.randint(20, V, (N,), device=DEVICE)
    y[4] = 3
    y[::5] = -100  # rows 0, 5, 10
    return s, t, y


def _compare_rows(backend, s, t, y, options, dtype):
    """Per-row loss and student gradient of ``backend`` against the float64 reference (non-finite values equal)."""
    x = s.clone().requires_grad_(True)
    x64 = s.double().requires_grad_(True)
    rows = kd_loss(x, t, y, backend=backend, reduction="none", **options)
    ref = kd_loss_reference(x64, t.double(), y, reduction="none", **options)
    finite = torch.isfinite(ref)
    assert_close(rows[finite], ref[finite], *LOSS_TOL[dtype], "finite rows")
    assert torch.equal(rows[~finite].double(), ref[~finite]), (rows, ref)
    rows.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(x64.grad).all()
    rtol, atol = GRAD_TOL[dtype]
    assert_close(x.grad, x64.grad, rtol, atol * x64.grad.abs().max().item(), "student grad")
    return rows, x.grad


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_mass_on_masked_token_is_inf(backend, dtype, label_smoothing):
    s, t, y = _student_masks_teacher_mass(dtype)
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=label_smoothing)
    rows, grad = _compare_rows(backend, s, t, y, options, dtype)
    assert torch.isposinf(rows[[1, 4]]).all(), "teacher mass where the student has none: KL = +inf"
    assert torch.isfinite(rows[[2, 3, 6]]).all()
    assert torch.isposinf(kd_loss(s, t, y, backend=backend, **options)), "the mean is +inf, not NaN"
    # α = 0: the KL term is left out, so the masked tokens only leave the vocabulary: finite.
    rows_ce = kd_loss(s, t, y, backend=backend, reduction="none", alpha=0.0, label_smoothing=label_smoothing)
    assert torch.isfinite(rows_ce).all()
    # The gradient on a masked token with teacher mass is the closed form's −(α·T²/T)·p_t/N_valid: not 0.
    assert (grad[1, 10:20] < 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_grad_of_infinite_kl_row_is_not_finite(backend):
    s, t, y = _student_masks_teacher_mass(torch.float32)
    tt = t.clone().requires_grad_(True)
    kd_loss(s, tt, y, backend=backend, temperature=2.0, teacher_grad=True, reduction="none").sum().backward()
    assert not torch.isfinite(tt.grad[1]).all() and not torch.isfinite(tt.grad[4]).all()
    t64 = t.double().requires_grad_(True)
    kd_loss_reference(s.double(), t64, y, temperature=2.0, teacher_grad=True, reduction="none").sum().backward()
    rows = [2, 3, 6, 7, 8, 9, 11]
    assert_close(tt.grad[rows], t64.grad[rows], 2e-5, 2e-5 * t64.grad[rows].abs().max().item(), "teacher grad")


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_label_on_masked_token_is_inf(backend, alpha, label_smoothing):
    s, t, y = masked_inputs("both")
    y[2] = int(torch.isinf(s[2]).nonzero()[0])  # a masked token
    options = dict(temperature=2.0, alpha=alpha, label_smoothing=label_smoothing)
    rows, _ = _compare_rows(backend, s, t, y, options, torch.float32)
    if alpha == 1.0:  # no CE term: the label does not matter
        assert torch.isfinite(rows).all()
    else:
        assert torch.isposinf(rows[2]) and torch.isfinite(rows[[1, 3, 4]]).all()


# ---- rows with no unmasked token ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_rows(backend):
    """An all −inf student row is NaN when it counts, 0 (with zero gradient) when it is ignored."""
    s, t, y = masked_inputs("both")
    s[3] = NEG_INF  # counted: NaN
    s[5] = NEG_INF  # y[5] is ignore_index: 0
    t[5] = NEG_INF
    assert y[5] == -100 and y[3] != -100
    x = s.clone().requires_grad_(True)
    rows = kd_loss(x, t, y, backend=backend, reduction="none", temperature=2.0, label_smoothing=0.1)
    rows.sum().backward()
    assert torch.isnan(rows[3]) and torch.isnan(x.grad[3]).all()
    assert rows[5] == 0 and (x.grad[5] == 0).all()
    others = [1, 2, 4, 6, 7]
    assert torch.isfinite(rows[others]).all() and torch.isfinite(x.grad[others]).all()
    ref = kd_loss_reference(s.double(), t.double(), y, reduction="none", temperature=2.0, label_smoothing=0.1)
    assert torch.isnan(ref[3]) and ref[5] == 0
    # A row of padding, ignored, leaves the mean finite.
    y[3] = -100
    assert torch.isfinite(kd_loss(s, t, y, backend=backend, temperature=2.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_teacher_row_is_nan(backend):
    s, t, y = masked_inputs("teacher")
    t[2] = NEG_INF
    rows = kd_loss(s, t, y, backend=backend, reduction="none", temperature=2.0)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[1, 3]]).all()


# ---- float64 and the Triton-compile fallback ------------------------------------------------------------------

@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("where", ["both", "teacher"])
def test_float64_masked(where, label_smoothing):
    s, t, y = masked_inputs(where, torch.float64)
    out, _ = check_against_reference(s, t, y, backend="auto", teacher_grad=True, temperature=2.0,
                                     label_smoothing=label_smoothing)
    assert out.dtype == torch.float64 and torch.isfinite(out)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["both", "teacher"])
def test_compile_fallback_masked(where, dtype):
    """``_run_reference`` (what ``backend="auto"`` uses when the Triton kernel fails to compile) on masked rows."""
    from spacedkd_fast.loss.args import canonicalize
    from spacedkd_fast.loss.function import _run_reference
    from spacedkd_fast.loss.options import KDOptions

    s, t, y = masked_inputs(where, dtype)
    options = KDOptions(temperature=2.0, alpha=0.4, label_smoothing=0.1, teacher_grad=True)
    loss, grad_s, grad_t = _run_reference(canonicalize(s, t, y, options), options, True, True)
    s64, t64 = s.double().requires_grad_(True), t.double().requires_grad_(True)
    ref = kd_loss_reference(s64, t64, y, temperature=2.0, alpha=0.4, label_smoothing=0.1, teacher_grad=True)
    ref.backward()
    assert loss.dtype == torch.float32 and grad_s.dtype == dtype and grad_t.dtype == dtype
    assert_close(loss[0], ref, *LOSS_TOL[dtype], "loss")
    rtol, atol = GRAD_TOL[dtype]
    assert_close(grad_s[0], s64.grad, rtol, atol * s64.grad.abs().max().item(), "student grad")
    assert_close(grad_t[0], t64.grad, rtol, atol * t64.grad.abs().max().item(), "teacher grad")
    assert (grad_s[0][torch.isinf(s)] == 0).all()
