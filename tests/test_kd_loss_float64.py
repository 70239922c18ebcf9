"""float64 stays float64: ``kd_loss`` on float64 logits computes in float64 (the reference), returns a float64 loss
and float64 gradients, and ``torch.autograd.gradcheck`` passes for every reduction, with and without a target,
label smoothing, K students and teacher gradients."""

import pytest
import torch

from spacedkd_fast import KDLoss, kd_loss, kd_loss_reference

NEG_INF = float("-inf")


def _inputs(n=4, v=5, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*((k, n, v) if k else (n, v)), generator=g, dtype=torch.float64) * 2
    t = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,), generator=g)
    y[1] = -100
    return s, t, y


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("students", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float64_loss_and_gradients(reduction, students, backend):
    s, t, y = _inputs(k=students)
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = kd_loss(s, t, y, temperature=2.0, alpha=0.3, label_smoothing=0.1, reduction=reduction,
                  teacher_grad=True, backend=backend)
    assert out.dtype == torch.float64
    out.sum().backward()
    assert s.grad.dtype == torch.float64 and t.grad.dtype == torch.float64
    ref = kd_loss_reference(s.detach(), t.detach(), y, temperature=2.0, alpha=0.3, label_smoothing=0.1,
                            reduction=reduction, teacher_grad=True)
    torch.testing.assert_close(out.detach(), ref, rtol=0, atol=0)


@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("students", [None, 2], ids=["single", "K2"])
@pytest.mark.parametrize("target, label_smoothing", [(True, 0.0), (True, 0.2), (False, 0.0)],
                         ids=["target", "target_smoothing", "no_target"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck(reduction, target, label_smoothing, students, teacher_grad):
    s, t, y = _inputs(k=students)
    s.requires_grad_(True)
    t.requires_grad_(teacher_grad)
    labels = y if target else None

    def fn(student, teacher):
        return kd_loss(student, teacher, labels, temperature=1.7, alpha=0.6, label_smoothing=label_smoothing,
                       reduction=reduction, teacher_grad=teacher_grad)

    assert torch.autograd.gradcheck(fn, (s, t))


def test_gradcheck_masked_tokens():
    """−inf in student and teacher (the same tokens) and in the teacher alone: gradients 0 there, exact elsewhere."""
    s, t, y = _inputs(n=4, v=6)
    s[:, 4] = NEG_INF
    t[:, 4] = NEG_INF
    t[0, 2] = NEG_INF
    y[0] = 1
    s.requires_grad_(True)
    t.requires_grad_(True)

    def fn(student, teacher):
        return kd_loss(student, teacher, y, temperature=2.0, alpha=0.5, label_smoothing=0.1, teacher_grad=True,
                       reduction="none")

    assert torch.autograd.gradcheck(fn, (s, t))


def test_mixed_float64_teacher():
    """One float64 tensor is enough: the loss is computed and returned in float64; each gradient keeps its input's
    dtype."""
    s, t, y = _inputs()
    s32 = s.float().requires_grad_(True)
    out = kd_loss(s32, t, y, temperature=2.0)
    assert out.dtype == torch.float64
    out.backward()
    assert s32.grad.dtype == torch.float32


def test_module_float64():
    s, t, y = _inputs()
    out = KDLoss(temperature=3.0, alpha=0.2)(s, t, y)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, kd_loss_reference(s, t, y, temperature=3.0, alpha=0.2), rtol=0, atol=0)


def test_kernel_backends_refuse_float64():
    s, t, y = _inputs()
    for backend in ("cpp", "triton"):
        with pytest.raises(ValueError, match=r"backend='(cpp|triton)' supports float32.*float64"):
            kd_loss(s, t, y, backend=backend)
