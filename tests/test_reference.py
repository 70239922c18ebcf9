"""The reference (the spec) against textbook PyTorch formulations and the analytic gradient of the issue."""

import pytest
import torch
import torch.nn.functional as F

from spacedkd_fast import kd_loss_reference


def _inputs(n=23, v=17, k=None, dtype=torch.float64):
    shape = (k, n, v) if k else (n, v)
    s = (torch.randn(*shape, dtype=dtype) * 2).requires_grad_(True)
    t = torch.randn(n, v, dtype=dtype) * 2
    y = torch.randint(0, v, (n,))
    y[::4] = -100
    return s, t, y


def _textbook_kl(s, t, temperature):
    # Per-row KL(softmax(t/T) || softmax(s/T)) from F.kl_div.
    return F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="none").sum(-1)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_alpha_zero_is_cross_entropy(label_smoothing):
    s, t, y = _inputs()
    ours = kd_loss_reference(s, t, y, alpha=0.0, label_smoothing=label_smoothing, temperature=3.0)
    theirs = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=label_smoothing)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_no_target_is_t2_kl_batchmean(temperature):
    s, t, _ = _inputs()
    ours = kd_loss_reference(s, t, None, temperature=temperature)
    theirs = temperature**2 * F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                                       log_target=True, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_squared", [True, False])
def test_mixture_per_row(t_squared):
    s, t, y = _inputs()
    temperature, alpha, eps = 2.5, 0.3, 0.1
    ours = kd_loss_reference(s, t, y, temperature=temperature, alpha=alpha, label_smoothing=eps, reduction="none",
                             t_squared=t_squared)
    ce = F.cross_entropy(s, y, ignore_index=-100, label_smoothing=eps, reduction="none")
    c = temperature**2 if t_squared else 1.0
    theirs = (1 - alpha) * ce + alpha * c * _textbook_kl(s, t, temperature)
    theirs = torch.where(y != -100, theirs, 0.0)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_gradient_matches_issue_formula():
    s, t, y = _inputs()
    temperature, alpha, eps = 2.0, 0.4, 0.2
    kd_loss_reference(s, t, y, temperature=temperature, alpha=alpha, label_smoothing=eps, reduction="sum").backward()
    v = s.shape[-1]
    valid = (y != -100)[:, None]
    onehot = F.one_hot(torch.where(y < 0, 0, y), v).double()
    expected = (1 - alpha) * (torch.softmax(s, -1) - (1 - eps) * onehot - eps / v) + alpha * temperature * (
        torch.softmax(s / temperature, -1) - torch.softmax(t / temperature, -1))
    torch.testing.assert_close(s.grad, torch.where(valid, expected, 0.0).detach(), rtol=1e-10, atol=1e-12)


def test_gradcheck_student_and_teacher():
    s, t, y = _inputs(n=6, v=5)
    t.requires_grad_(True)
    fn = lambda a, b: kd_loss_reference(a, b, y, temperature=1.7, alpha=0.6, label_smoothing=0.1,
                                        reduction="none", teacher_grad=True)
    assert torch.autograd.gradcheck(fn, (s, t))


def test_mean_divides_by_non_ignored_rows():
    s, t, y = _inputs()
    per_row = kd_loss_reference(s, t, y, reduction="none")
    mean = kd_loss_reference(s, t, y, reduction="mean")
    torch.testing.assert_close(mean, per_row.sum() / (y != -100).sum())


def test_multi_student_equals_separate_calls():
    s, t, y = _inputs(k=3)
    joint = kd_loss_reference(s, t, y, temperature=2.0, reduction="none")
    for k in range(3):
        torch.testing.assert_close(joint[k], kd_loss_reference(s[k], t, y, temperature=2.0, reduction="none"))
    assert kd_loss_reference(s, t, y).shape == (3,)


def test_zero_probability_teacher_entries_are_finite():
    s, t, y = _inputs()
    t[:, :3] = float("-inf")  # masked vocabulary entries
    out = kd_loss_reference(s, t, y, temperature=2.0)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(s.grad).all()
