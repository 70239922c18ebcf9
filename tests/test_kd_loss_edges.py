"""Bad input, empty and degenerate problems, non-finite values, extreme logits, torch.compile, launch budget."""

import re

import pytest
import torch
from helpers import DEVICE, LOSS_BACKENDS, assert_close, make_logits, make_target

from spacedkd_fast import KDLoss, kd_loss, kd_loss_reference

BACKENDS = LOSS_BACKENDS


# ---- bad input: clear errors naming the argument --------------------------------------------------------------

def _args(n=4, v=10):
    return make_logits(n, v), make_logits(n, v), make_target(n, v, ignore_every=0)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (dict(student_logits=make_logits(4, 11)), ValueError,
         r"student_logits shape \(4, 11\) does not match teacher_logits shape \(4, 10\)"),
        (dict(teacher_logits=make_logits(3, 10)), ValueError, r"\(4, 10\).*\(3, 10\)"),
        (dict(student_logits=torch.ones(4, 10, dtype=torch.long)), TypeError, "student_logits must be a floating"),
        (dict(teacher_logits=torch.ones(4, 10, dtype=torch.int32)), TypeError, "teacher_logits must be a floating"),
        (dict(student_logits=[[1.0]]), TypeError, "student_logits must be a torch.Tensor"),
        (dict(target=torch.zeros(4)), TypeError, "target must be an integer tensor"),
        (dict(target=torch.zeros(4, dtype=torch.bool)), TypeError, "target must be an integer tensor"),
        (dict(target=torch.zeros(5, dtype=torch.long)), ValueError, r"target shape \(5,\) does not match"),
        (dict(target=torch.tensor([0, 1, 10, 2])), ValueError, r"outside \[0, 10\).*\[10\]"),
        (dict(target=torch.tensor([0, -1, 3, 2])), ValueError, r"outside \[0, 10\).*\[-1\]"),
        (dict(temperature=0.0), ValueError, r"temperature must be in \(0, inf\), got 0.0"),
        (dict(temperature=-1), ValueError, "temperature must be in"),
        (dict(temperature=float("nan")), ValueError, "temperature must be in"),
        (dict(temperature="2"), TypeError, "temperature must be a real number"),
        (dict(alpha=1.5), ValueError, r"alpha must be in \[0, 1\], got 1.5"),
        (dict(alpha=-0.1), ValueError, "alpha must be in"),
        (dict(label_smoothing=1.0), ValueError, r"label_smoothing must be in \[0, 1\), got 1.0"),
        (dict(reduction="batchmean"), ValueError, r"reduction must be one of \('mean', 'sum', 'none'\)"),
        (dict(backend="cuda"), ValueError, r"backend must be one of \('auto', 'triton', 'cpp', 'torch'\)"),
        (dict(ignore_index=1.0), TypeError, "ignore_index must be an int"),
    ],
)
def test_bad_input_names_the_argument(change, error, pattern):
    s, t, y = _args()
    kwargs = dict(student_logits=s, teacher_logits=t, target=y)
    kwargs.update(change)
    with pytest.raises(error, match=pattern):
        kd_loss(**kwargs)


def test_error_loses_nothing():
    s, t, y = _args()
    s.requires_grad_(True)
    before = s.detach().clone()
    with pytest.raises(ValueError):
        kd_loss(s, t, y, alpha=2.0)
    assert torch.equal(s.detach(), before) and s.grad is None


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)
    with pytest.raises(ValueError, match="backend"):
        KDLoss(backend="fast")
    loss_fn = KDLoss(temperature=2.0, alpha=0.25)
    s, t, y = _args()
    assert "temperature=2.0" in repr(loss_fn)
    torch.testing.assert_close(loss_fn(s, t, y), kd_loss(s, t, y, temperature=2.0, alpha=0.25))


def test_unavailable_backend_says_why():
    s, t, y = _args()
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="backend='triton'"):
            import os
            if os.environ.get("TRITON_INTERPRET") == "1":
                pytest.skip("the interpreter runs Triton on CPU tensors")
            kd_loss(s, t, y, backend="triton")
    with pytest.raises(ValueError, match="float64"):
        kd_loss(s.double(), t.double(), y, backend="cpp")


# ---- empty and degenerate problems: loss 0, zero gradient, never NaN ------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, reduction):
    s = make_logits(0, 10).requires_grad_(True)
    t = make_logits(0, 10)
    out = kd_loss(s, t, torch.zeros(0, dtype=torch.long, device=DEVICE), backend=backend, reduction=reduction)
    assert out.shape == ((0,) if reduction == "none" else ())
    out.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))
    if reduction != "none":
        assert out.item() == 0.0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(backend, reduction):
    s = make_logits(6, 30).requires_grad_(True)
    t = make_logits(6, 30).requires_grad_(True)
    y = torch.full((6,), -100, device=DEVICE)
    out = kd_loss(s, t, y, backend=backend, reduction=reduction, teacher_grad=True)
    out.sum().backward()
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.equal(s.grad, torch.zeros_like(s)) and torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    s, t = make_logits(8, 20), make_logits(8, 20)
    y = make_target(8, 20, ignore_every=3, ignore_index=7)
    y[1] = 5
    out = kd_loss(s, t, y, ignore_index=7, backend=backend, reduction="none")
    ref = kd_loss_reference(s.double(), t.double(), y, ignore_index=7, reduction="none")
    assert_close(out, ref, 2e-5, 2e-5, "loss")
    assert (out[y == 7] == 0).all()


# ---- non-finite inputs propagate; huge logits stay accurate ---------------------------------------------------

@pytest.mark.parametrize("where", ["student_nan", "teacher_nan", "student_inf", "teacher_inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate(backend, where):
    s, t, y = make_logits(5, 40), make_logits(5, 40), make_target(5, 40, ignore_every=0)
    value = float("nan") if where.endswith("nan") else float("inf")
    (s if where.startswith("student") else t)[2, 7] = value
    s.requires_grad_(True)
    rows = kd_loss(s, t, y, backend=backend, reduction="none", temperature=2.0)
    assert not torch.isfinite(rows[2]), "the poisoned row must not look finite"
    assert torch.isfinite(rows[[0, 1, 3, 4]]).all(), "other rows are unaffected"
    assert not torch.isfinite(kd_loss(s, t, y, backend=backend)), "the mean carries it"
    rows.sum().backward()
    assert not torch.isfinite(s.grad[2]).all()
    assert torch.isfinite(s.grad[[0, 1, 3, 4]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_teacher_probability_is_finite(backend):
    s, t, y = make_logits(5, 40), make_logits(5, 40), make_target(5, 40, ignore_every=0)
    t[:, :5] = float("-inf")
    s.requires_grad_(True)
    out = kd_loss(s, t, y, backend=backend, temperature=2.0, teacher_grad=False)
    out.backward()
    ref = kd_loss_reference(s.detach().double(), t.double(), y, temperature=2.0)
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
    assert_close(out, ref, 2e-5, 2e-5, "loss")


@pytest.mark.parametrize("close_teacher", [False, True], ids=["random_teacher", "shifted_student"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_small_temperature(backend, close_teacher):
    """Logits of magnitude 1e4 at T = 0.05 stay finite and accurate, also when KL is tiny (student ≈ teacher + c)."""
    n, v = 16, 300
    t = make_logits(n, v, scale=1e4)
    s = (t.double() + 5e3 + torch.randn(n, v, dtype=torch.float64, device=DEVICE) * 1e-3).float() if close_teacher \
        else make_logits(n, v, scale=1e4)
    y = make_target(n, v, ignore_every=0)
    s.requires_grad_(True)
    options = dict(temperature=0.05, alpha=0.5, reduction="none")
    rows = kd_loss(s, t, y, backend=backend, **options)
    rows.sum().backward()
    s64 = s.detach().double().requires_grad_(True)
    ref = kd_loss_reference(s64, t.double(), y, **options)
    ref.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(s.grad).all()
    kl_rows = kd_loss(s, t, None, backend=backend, temperature=0.05, reduction="none")
    kl_ref = kd_loss_reference(s64.detach(), t.double(), None, temperature=0.05, reduction="none")
    # The KL term alone, scaled back by 1/T², in nats: fp32-relative where KL is large (random teacher, ~1e5 nats),
    # within 0.05 nat where it is tiny (the student equals the teacher up to a shift and 1e-3 noise).
    kl_err = (kl_rows.double() - kl_ref).abs() / 0.05**2
    assert (kl_err <= 1e-5 * kl_ref.abs() / 0.05**2 + 5e-2).all(), kl_err.max()
    assert_close(rows, ref, 1e-5, 1e-2, "loss")
    assert_close(s.grad, s64.grad, 1e-4, 1e-4, "student grad")


# ---- torch.compile -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    s, t, y = make_logits(9, 70), make_logits(9, 70), make_target(9, 70)

    def step(student, teacher, target):
        return kd_loss(student, teacher, target, temperature=2.0, alpha=0.3, backend=backend) * 2.0 + 1.0

    compiled = torch.compile(step, fullgraph=True)
    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out_c, out_e = compiled(x1, t, y), step(x2, t, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)


# ---- launch budget: one kernel forward, an in-place multiply (at most) backward --------------------------------

def _ops_during(fn, paused=lambda: False):
    """``(result, [(aten op, output numel)])`` of the ops that compute (allocations and views excluded), except
    while ``paused()`` (the Triton interpreter's own copies inside a launch)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    allocation = re.compile(r"aten\.(empty|empty_strided|new_empty|as_strided|view|reshape|_unsafe_view|detach|"
                            r"alias|expand|squeeze|unsqueeze|t|select|slice)\b")

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func)
            if not allocation.match(name) and not paused():
                numel = out.numel() if isinstance(out, torch.Tensor) else 0
                self.ops.append((name, numel))
            return out

    with OpCounter() as counter:
        result = fn()
    return result, counter.ops


def _assert_backward_allocates_no_gradient(ops, numel):
    """Backward may read grad_output and scale in place, but never produce a new gradient-sized tensor."""
    new_big = [op for op, n in ops if n >= numel and not op.startswith("aten.mul_")]
    assert not new_big, new_big


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(128, 100), (1024, 100)], ids=["single_program", "grid"])
def test_launch_budget(monkeypatch, shape):
    """One Triton launch forward (plus the valid-row count and the row sum on the multi-program path); the
    backward scales the saved gradient in place (or, on CPU with grad_output 1, not at all)."""
    from spacedkd_fast.kernels import kd_loss as kd_kernels
    from spacedkd_fast.kernels import launch

    launches, running = [], [False]
    original = kd_kernels._kd_loss_fwd_kernel.run

    def counting_run(*args, **kwargs):
        launches.append("kd_loss_fwd")
        running[0] = True
        try:
            return original(*args, **kwargs)
        finally:
            running[0] = False

    monkeypatch.setattr(kd_kernels._kd_loss_fwd_kernel, "run", counting_run)
    # On CPU tensors the label range check runs (it is free there); on CUDA it is off, as it would cost a sync.
    if DEVICE == "cpu":
        from spacedkd_fast.loss import api

        monkeypatch.setattr(api, "check_target_values", lambda *a: None)
    n, v = shape
    single = launch.kd_loss_config(n, 1, v, reduced=True)["SINGLE_PROGRAM"]
    assert single == (n * v <= launch.SINGLE_PROGRAM_MAX_ELEMENTS)
    s = make_logits(n, v).requires_grad_(True)
    t, y = make_logits(n, v), make_target(n, v)
    loss, fwd = _ops_during(lambda: kd_loss(s, t, y, temperature=2.0, alpha=0.3, backend="triton"),
                            paused=lambda: running[0])
    _, bwd = _ops_during(loss.backward)
    fwd_ops = [op for op, _ in fwd]
    assert launches == ["kd_loss_fwd"], launches
    # The multi-program path counts the non-ignored rows on the device (no sync) and sums the per-row losses.
    assert fwd_ops == ([] if single else ["aten.ne.Scalar", "aten.sum.default", "aten.sum.dim_IntList"]), fwd_ops
    _assert_backward_allocates_no_gradient(bwd, n * v)
    ref = kd_loss_reference(s.detach().double(), t.double(), y, temperature=2.0, alpha=0.3)
    assert_close(loss, ref, 2e-5, 2e-5, "loss")
    ref_s = s.detach().double().requires_grad_(True)
    kd_loss_reference(ref_s, t.double(), y, temperature=2.0, alpha=0.3).backward()
    assert_close(s.grad, ref_s.grad, 2e-5, 2e-5 * ref_s.grad.abs().max().item(), "student grad")


# ---- backward: in place when the graph is not retained, a copy when it is --------------------------------------

@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("upstream", ["ones", "scaled"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_backward_allocates_no_new_gradient(backend, upstream, teacher_grad):
    n, v = 64, 300
    s = make_logits(n, v).requires_grad_(True)
    t = make_logits(n, v).requires_grad_(teacher_grad)
    y = make_target(n, v)
    loss = kd_loss(s, t, y, temperature=2.0, alpha=0.3, backend=backend, teacher_grad=teacher_grad)
    scale = 1.0 if upstream == "ones" else 0.37
    _, bwd = _ops_during(lambda: (loss * scale).backward())
    _assert_backward_allocates_no_gradient(bwd, n * v)
    s_ref, t_ref = s.detach().double().requires_grad_(True), t.detach().double().requires_grad_(teacher_grad)
    (kd_loss_reference(s_ref, t_ref, y, temperature=2.0, alpha=0.3, teacher_grad=teacher_grad) * scale).backward()
    assert_close(s.grad, s_ref.grad, 2e-5, 2e-5 * s_ref.grad.abs().max().item(), "student grad")
    if teacher_grad:
        assert_close(t.grad, t_ref.grad, 2e-5, 2e-5 * t_ref.grad.abs().max().item(), "teacher grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("students", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_retain_graph_backward_twice(backend, students, reduction):
    """With retain_graph=True the saved gradients must survive the first backward: twice the same gradient."""
    n, v = 16, 50
    s = make_logits(*((students, n, v) if students else (n, v))).requires_grad_(True)
    t, y = make_logits(n, v).requires_grad_(True), make_target(n, v)
    loss = kd_loss(s, t, y, temperature=2.0, alpha=0.3, backend=backend, reduction=reduction, teacher_grad=True)
    upstream = torch.rand(loss.shape, device=DEVICE) + 0.5
    grads = []
    for _ in range(2):
        s.grad, t.grad = None, None
        loss.backward(upstream, retain_graph=True)
        grads.append((s.grad.clone(), t.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])
    s.grad, t.grad = None, None
    loss.backward(upstream)  # the last one may scale in place
    assert torch.equal(s.grad, grads[0][0]) and torch.equal(t.grad, grads[0][1])
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward(upstream)  # freed now, as autograd promises


def test_options_are_checked_once_per_distinct_values_and_bad_ones_every_time():
    """kd_loss reuses the checked options of hyperparameters it has seen (a training loop's every step), keeps
    types apart (``alpha=True`` is refused although ``True == 1``), and checks what cannot be cached."""
    from spacedkd_fast.loss import options as options_module

    s, t, y = torch.randn(4, 6), torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    options_module._cached_options.cache_clear()
    a = kd_loss(s, t, y, temperature=2.0, alpha=1)
    b = kd_loss(s, t, y, temperature=2.0, alpha=1)
    assert torch.equal(a, b) and options_module._cached_options.cache_info().hits >= 1
    with pytest.raises(TypeError, match="alpha must be a real number, got bool"):
        kd_loss(s, t, y, temperature=2.0, alpha=True)
    with pytest.raises(TypeError, match="temperature must be a real number, got Tensor"):
        kd_loss(s, t, y, temperature=torch.tensor(2.0))
    for _ in range(2):  # a refused value is refused again (never cached)
        with pytest.raises(ValueError, match="temperature must be in"):
            kd_loss(s, t, y, temperature=float("nan"))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "cpp"])
def test_a_second_derivative_through_kd_loss_raises(backend):
    """The fused backward (the autograd.Function every kernel backend shares; autograd's reference, the "torch"
    backend, is twice differentiable) is not itself differentiable: recording it (``create_graph=True`` with an
    upstream gradient that requires grad) and differentiating again raises torch's once-differentiable error,
    never a silent 0. Skipped where the C++ extension is not built."""
    s = torch.randn(4, 6, device=DEVICE, requires_grad=True)
    t, y = torch.randn(4, 6, device=DEVICE), torch.tensor([0, 1, 2, 3], device=DEVICE)
    w = torch.tensor(2.0, device=DEVICE, requires_grad=True)
    (g,) = torch.autograd.grad(kd_loss(s, t, y, temperature=2.0, backend=backend) * w, s, create_graph=True)
    assert g.requires_grad
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()
