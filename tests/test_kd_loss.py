"""Every kd_loss backend against the float64 reference: shapes × dtypes × hyperparameters × reductions.

The C++ and torch backends run in the plain CPU test run. The Triton backend runs on CUDA, or on CPU through
``TRITON_INTERPRET=1 pytest -m triton`` (small shapes; ``small_blocks`` forces the multi-block online path that
large vocabularies take on a GPU).
"""

import pytest
import torch
from helpers import LOSS_BACKENDS, assert_close, check_against_reference, make_logits, make_target

from spacedkd_fast import kd_loss
from spacedkd_fast.kernels import launch

BACKENDS = LOSS_BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEFAULTS = dict(temperature=2.0, alpha=0.3, label_smoothing=0.1)


@pytest.fixture(params=["default_blocks", "small_blocks"])
def block_size(request, monkeypatch):
    """Triton column block: the default, or 64 so that every vocabulary > 64 streams through several blocks."""
    if request.param == "small_blocks":
        monkeypatch.setattr(launch, "MAX_BLOCK_V", 64)
    return request.param


SHAPES = [(37, 1271), (64, 2), (64, 100), (16, 1000), (4, 32000), (2, 70001)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_and_dtypes(backend, shape, dtype):
    n, v = shape
    check_against_reference(make_logits(n, v, dtype=dtype), make_logits(n, v, dtype=dtype), make_target(n, v),
                            backend=backend, **DEFAULTS)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hyperparameters(backend, temperature, alpha, label_smoothing):
    n, v = 37, 301
    check_against_reference(make_logits(n, v), make_logits(n, v), make_target(n, v), backend=backend,
                            temperature=temperature, alpha=alpha, label_smoothing=label_smoothing)


@pytest.mark.triton
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("v", [100, 1271])
def test_triton_online_blocks(block_size, v, temperature):
    """Single-pass and multi-block online paths agree with the reference, including the teacher gradient."""
    n = 19
    check_against_reference(make_logits(n, v), make_logits(n, v), make_target(n, v), backend="triton",
                            teacher_grad=True, temperature=temperature, alpha=0.4, label_smoothing=0.1)


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("students", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_multi_student_teacher_grad(backend, reduction, students, teacher_grad):
    n, v = 29, 211
    s_shape = (students, n, v) if students else (n, v)
    out, _ = check_against_reference(make_logits(*s_shape), make_logits(n, v), make_target(n, v), backend=backend,
                                     reduction=reduction, teacher_grad=teacher_grad, **DEFAULTS)
    expected_shape = {"none": s_shape[:-1], "mean": s_shape[:-2], "sum": s_shape[:-2]}[reduction]
    assert out.shape == expected_shape


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_target_is_kl_only(backend, reduction):
    n, v = 21, 133
    check_against_reference(make_logits(n, v), make_logits(n, v), None, backend=backend, reduction=reduction,
                            teacher_grad=True, temperature=3.0, alpha=0.9)


def _strided_cases():
    """(name, student, teacher, target) with non-contiguous layouts, built from larger buffers."""
    b, t, v = 3, 7, 150
    base_s = make_logits(b, t + 1, v + 9)
    base_t = make_logits(t + 1, b, v)
    yield "column_slice", base_s[:, :t, :v], base_t[:t].transpose(0, 1), make_target(b * t, v).view(b, t)
    yield "time_shift", base_s[:, :-1, 2:v + 2], base_t.transpose(0, 1)[:, 1:], make_target(b * t, v).view(b, t)
    yield "transposed_batch", base_s[:, :t, :v].transpose(0, 1), base_t[:t], make_target(t * b, v).view(t, b)
    wide = make_logits(40, 2 * v)
    yield "strided_vocab", wide[:, ::2], make_logits(40, v), make_target(40, v)
    yield "expanded_teacher", make_logits(b, t, v), make_logits(1, t, v).expand(b, t, v), make_target(b * t, v).view(
        b, t)


@pytest.mark.parametrize("case", list(_strided_cases()), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend, case):
    _, student, teacher, target = case
    assert not student.is_contiguous() or not teacher.is_contiguous()
    check_against_reference(student, teacher, target, backend=backend, reduction="none", teacher_grad=True,
                            **DEFAULTS)


@pytest.mark.parametrize("case", list(_strided_cases())[:3], ids=lambda c: c[0])
def test_strided_views_do_not_copy(case):
    from spacedkd_fast.loss.args import canonicalize
    from spacedkd_fast.loss.options import KDOptions

    _, student, teacher, target = case
    problem = canonicalize(student, teacher, target, KDOptions())
    s4, t3 = problem.strided_views()
    assert s4.untyped_storage().data_ptr() == student.untyped_storage().data_ptr()
    assert t3.untyped_storage().data_ptr() == teacher.untyped_storage().data_ptr()


@pytest.mark.parametrize("backend", BACKENDS)
def test_multi_student_equals_separate_calls(backend):
    n, v, k = 17, 97, 3
    s = make_logits(k, n, v).requires_grad_(True)
    t = make_logits(n, v).requires_grad_(True)
    y = make_target(n, v)
    kd_loss(s, t, y, backend=backend, teacher_grad=True, **DEFAULTS).sum().backward()
    joint_s, joint_t = s.grad.clone(), t.grad.clone()
    s.grad, t.grad = None, None
    sum(kd_loss(s[i], t, y, backend=backend, teacher_grad=True, **DEFAULTS) for i in range(k)).backward()
    torch.testing.assert_close(joint_s, s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(joint_t, t.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_last_layer(backend):
    """The saved gradient is scaled by whatever flows back, also through further ops on the loss."""
    n, v = 33, 120
    s = make_logits(n, v)
    t = make_logits(n, v)
    y = make_target(n, v)
    grads = []
    for b in (backend, "torch"):
        x = s.double().requires_grad_(True) if b == "torch" else s.clone().requires_grad_(True)
        per_row = kd_loss(x, t.to(x.dtype), y, backend=b, reduction="none", **DEFAULTS)
        mean = kd_loss(x, t.to(x.dtype), y, backend=b, **DEFAULTS)
        (per_row.square().sum() * 0.5 + 3.0 * mean - mean.exp()).backward()
        grads.append(x.grad.double())
    assert_close(grads[0], grads[1], rtol=2e-5, atol=2e-5 * grads[1].abs().max().item(), what="student grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_only_under_no_grad(backend):
    n, v = 12, 50
    s, t, y = make_logits(n, v).requires_grad_(True), make_logits(n, v), make_target(n, v)
    with torch.no_grad():
        out = kd_loss(s, t, y, backend=backend)
    assert not out.requires_grad
    torch.testing.assert_close(out, kd_loss(s.double(), t.double(), y, backend="torch").detach().float())
