"""Test utilities: inputs, the float64 oracle, and per-dtype tolerances."""

from __future__ import annotations

import pytest
import torch

from spacedkd_fast import kd_loss, kd_loss_reference

# (rtol, atol) for the loss (always fp32 math on the input values) and for gradients, whose atol is relative to
# the largest reference gradient. fp32: twice the error of PyTorch's own fp32 softmax at V = 32000 (8e-6).
# Low-precision gradients are rounded to their dtype once in the kernel and once by the grad_output multiply:
# two half-ulps of bf16 (2^-9) / fp16 (2^-12), with margin; the Triton interpreter truncates to bf16 instead of
# rounding (one full ulp, 2^-8), which the bf16 rtol also covers.
# float64 inputs run on the reference in float64: the same computation as the oracle, up to summation order.
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5),
            torch.float64: (1e-12, 1e-12)}
GRAD_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-3), torch.float16: (2e-3, 3e-4),
            torch.float64: (1e-12, 1e-12)}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _loss_backends():
    """kd_loss backends the loss tests run: the torch reference and, on a CPU, the C++ kernel (skipped, saying so,
    where the extension is not built: the GPU acceptance run installs without it), plus Triton."""
    from spacedkd_fast import backends

    cpp = pytest.param("cpp", marks=pytest.mark.skipif(
        not backends.cpp_extension().available,
        reason=f"the C++ extension is not built ({backends.cpp_extension().detail})"))
    return [pytest.param("torch")] + ([cpp] if DEVICE == "cpu" else []) + [
        pytest.param("triton", marks=pytest.mark.triton)]


LOSS_BACKENDS = _loss_backends()


def make_logits(*shape, dtype=torch.float32, scale=3.0, device=DEVICE):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def make_target(n, vocab, ignore_every=5, ignore_index=-100, device=DEVICE):
    y = torch.randint(0, vocab, (n,), device=device)
    if ignore_every:
        y[::ignore_every] = ignore_index
    return y


def assert_close(actual, expected, rtol, atol, what):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def check_against_reference(student, teacher, target=None, *, backend, grad_output=True, teacher_grad=False,
                            **options):
    """Run ``backend`` and the float64 reference on the same values; compare loss and gradients.

    The reference gets the inputs upcast exactly to float64, so the only error measured is the backend's.
    ``grad_output=True`` backpropagates a random upstream gradient (the loss is not the last op).
    """
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    s_ref = student.detach().double().requires_grad_(True)
    t_ref = teacher.detach().double().requires_grad_(teacher_grad)
    s_before, t_before = s.detach().clone(), t.detach().clone()

    out = kd_loss(s, t, target, backend=backend, teacher_grad=teacher_grad, **options)
    ref = kd_loss_reference(s_ref, t_ref, target, teacher_grad=teacher_grad, **options)
    loss_dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
    assert out.dtype == loss_dtype, f"loss dtype {out.dtype}, expected {loss_dtype}"
    rtol, atol = LOSS_TOL[student.dtype]
    assert_close(out, ref, rtol, atol * max(1.0, ref.detach().abs().max().item()), "loss")

    upstream = torch.randn(ref.shape, dtype=torch.float64, device=ref.device) if grad_output else torch.ones_like(ref)
    (out * upstream.to(out.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    rtol, atol = GRAD_TOL[student.dtype]
    g_scale = max(s_ref.grad.abs().max().item(), 1e-30)
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    assert_close(s.grad, s_ref.grad, rtol, atol * g_scale, "student grad")
    if teacher_grad:
        t_scale = max(t_ref.grad.abs().max().item(), 1e-30)
        assert t.grad.dtype == teacher.dtype and t.grad.shape == teacher.shape
        rtol_t, atol_t = GRAD_TOL[teacher.dtype]
        assert_close(t.grad, t_ref.grad, rtol_t, atol_t * t_scale, "teacher grad")
    else:
        assert t.grad is None
    # The caller's logits are never overwritten.
    assert torch.equal(s.detach(), s_before) and torch.equal(t.detach(), t_before)
    return out, ref


# Damage done to a miniature tiny-imagenet-200/ (train/<wnid>/images/<wnid>_<i>.JPEG, val/images/val_0..3.JPEG) and
# the error it must raise: the layout checks of the one folder scanner behind load_dataset and scan_folder_dataset.
TINY_IMAGENET_LAYOUT_DAMAGE = [
    (lambda r: (r / "val" / "val_annotations.txt").unlink(), FileNotFoundError,
     r"tiny-imagenet-200/ with wnids.txt, train/<wnid>/images/\*.JPEG.*missing val/val_annotations.txt"),
    (lambda r: (r / "wnids.txt").unlink(), FileNotFoundError, r"missing wnids.txt; found in"),
    (lambda r: (r / "wnids.txt").write_text("n01\nn02\nn03\nn04\n"), FileNotFoundError,
     r"no images in .*n04.*expected tiny-imagenet-200/"),
    (lambda r: (r / "wnids.txt").write_text("n01\nn01\n"), ValueError, r"must list distinct wnids"),
    (lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\t0\t0\t1\t1\n"), ValueError,
     r"line 1: wnid 'n09' is not in"),
    (lambda r: (r / "val" / "val_annotations.txt").write_text("val_0.JPEG n01\n"), ValueError,
     r"line 1: expected tab-separated 'filename, wnid"),
    (lambda r: (r / "val" / "images" / "val_2.JPEG").unlink(), FileNotFoundError,
     r"lists 4 images, 1 missing .*val_2.JPEG"),
]
