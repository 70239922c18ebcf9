"""Teacher and student vocabularies of different sizes: ``vocab_mismatch``.

Vt > Vs raises unless ``vocab_mismatch="truncate"``, which restricts the teacher to the student's ids and
renormalizes (the teacher logits sliced ``[..., :Vs]``, handed to every backend as a strided view, never copied);
Vt < Vs always raises. Triton cases run with ``TRITON_INTERPRET=1 pytest -m triton``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOSS_BACKENDS, assert_close, make_logits, make_target

from spacedkd_fast import KDLoss, kd_loss, kd_loss_reference
from spacedkd_fast.kernels import launch
from spacedkd_fast.loss.args import canonicalize
from spacedkd_fast.loss.options import KDOptions

BACKENDS = LOSS_BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
VS, VT = 250, 287  # e.g. 151936 and 152064 at a test's size


def _truncated_reference_check(backend, student, teacher, target, **options):
    """``backend`` with ``vocab_mismatch="truncate"`` against the float64 reference on the sliced teacher (a plain
    same-vocabulary problem): loss, student gradient, and the teacher gradient, 0 on the columns past Vs."""
    vs = student.shape[-1]
    teacher_grad = options.pop("teacher_grad", False)
    s = student.detach().clone().requires_grad_(True)
    t = teacher.detach().clone().requires_grad_(teacher_grad)
    out = kd_loss(s, t, target, backend=backend, vocab_mismatch="truncate", teacher_grad=teacher_grad, **options)
    upstream = torch.randn(out.shape, device=DEVICE)
    (out * upstream).sum().backward()

    s64 = student.detach().double().requires_grad_(True)
    t64 = teacher.detach()[..., :vs].double().contiguous().requires_grad_(teacher_grad)
    ref = kd_loss_reference(s64, t64, target, teacher_grad=teacher_grad, **options)
    (ref * upstream.double()).sum().backward()
    tol = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-2, 2e-3), torch.float16: (2e-3, 3e-4)}
    assert_close(out, ref, 2e-5, 2e-5 * max(1.0, ref.abs().max().item()), "loss")
    rtol, atol = tol[student.dtype]
    assert_close(s.grad, s64.grad, rtol, atol * s64.grad.abs().max().item(), "student grad")
    if teacher_grad:
        assert t.grad.shape == teacher.shape
        assert (t.grad[..., vs:] == 0).all(), "the teacher columns past the student's vocabulary get no gradient"
        rtol, atol = tol[teacher.dtype]
        assert_close(t.grad[..., :vs], t64.grad, rtol, atol * t64.grad.abs().max().item(), "teacher grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_matches_sliced_teacher(backend, dtype):
    n = 19
    _truncated_reference_check(backend, make_logits(n, VS, dtype=dtype), make_logits(n, VT, dtype=dtype),
                               make_target(n, VS), temperature=2.0, alpha=0.4, label_smoothing=0.1,
                               teacher_grad=True, reduction="none")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("students", [None, 3], ids=["single", "K3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_sequences_and_students(backend, students, reduction):
    """(B, T, V) logits, time-shifted (the usual next-token view), with K students."""
    b, t_len = 3, 6
    student = make_logits(*((students,) if students else ()), b, t_len + 1, VS)[..., :-1, :]
    teacher = make_logits(b, t_len + 1, VT)[:, :-1]
    target = make_target(b * t_len, VS).view(b, t_len)
    _truncated_reference_check(backend, student, teacher, target, temperature=3.0, alpha=0.7, teacher_grad=True,
                               reduction=reduction)


@pytest.mark.triton
def test_truncate_triton_streamed_blocks(monkeypatch):
    monkeypatch.setattr(launch, "MAX_BLOCK_V", 64)
    n = 9
    _truncated_reference_check("triton", make_logits(n, VS), make_logits(n, VT), make_target(n, VS),
                               temperature=2.0, label_smoothing=0.1, teacher_grad=True, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
def test_truncate_without_target(backend):
    n = 11
    _truncated_reference_check(backend, make_logits(n, VS), make_logits(n, VT), None, temperature=2.0,
                               teacher_grad=True, reduction="none")


def test_truncate_is_the_restricted_renormalized_teacher():
    """The spec: the teacher's distribution over all Vt ids, restricted to the student's and renormalized."""
    n, temperature = 7, 2.5
    s = torch.randn(n, VS, dtype=torch.float64) * 2
    t = torch.randn(n, VT, dtype=torch.float64) * 2
    p = torch.softmax(t / temperature, dim=-1)[:, :VS]
    p = p / p.sum(dim=-1, keepdim=True)
    log_q = F.log_softmax(s / temperature, dim=-1)
    expected = temperature**2 * (p * (p.log() - log_q)).sum(dim=-1)
    ours = kd_loss_reference(s, t, None, temperature=temperature, reduction="none", vocab_mismatch="truncate")
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_same_vocabulary_ignores_the_option():
    s, t, y = make_logits(5, VS), make_logits(5, VS), make_target(5, VS)
    torch.testing.assert_close(kd_loss(s, t, y, vocab_mismatch="truncate"), kd_loss(s, t, y), rtol=0, atol=0)


# ---- no copy of the teacher -----------------------------------------------------------------------------------

def test_truncated_teacher_is_a_view():
    s, t = make_logits(2, 5, VS), make_logits(2, 5, VT)
    problem = canonicalize(s, t, None, KDOptions(vocab_mismatch="truncate"))
    assert problem.teacher.data_ptr() == t.data_ptr() and problem.teacher.stride() == t.stride()
    assert problem.teacher_rows().data_ptr() == t.data_ptr()  # what the torch backend reads
    _, teacher3 = problem.strided_views()
    assert teacher3.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert teacher3.stride(1) == VT and teacher3.shape[-1] == VS


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "torch"])
def test_kernels_read_the_teacher_in_place(backend, monkeypatch):
    """The kernel is handed the caller's teacher storage with its row stride Vt, not a copy."""
    seen = []
    if backend == "cpp":
        from spacedkd_fast import _C

        original = _C.kd_loss_forward

        def spy(student, teacher, *args):
            seen.append((teacher.data_ptr(), teacher.stride()))
            return original(student, teacher, *args)

        monkeypatch.setattr(_C, "kd_loss_forward", spy)
    else:
        import spacedkd_fast.kernels as kernels

        original = kernels.kd_loss_forward

        def spy(student, teacher, *args, **kwargs):
            seen.append((teacher.data_ptr(), teacher.stride()))
            return original(student, teacher, *args, **kwargs)

        monkeypatch.setattr(kernels, "kd_loss_forward", spy)
    s = make_logits(8, VS).requires_grad_(True)
    t = make_logits(8, VT)
    kd_loss(s, t, make_target(8, VS), backend=backend, vocab_mismatch="truncate").backward()
    assert seen and seen[0][0] == t.data_ptr() and seen[0][1][-2:] == (VT, 1), seen


# ---- bad input ------------------------------------------------------------------------------------------------

def test_larger_teacher_vocabulary_needs_the_option():
    s, t, y = make_logits(4, VS), make_logits(4, VT), make_target(4, VS)
    pattern = (rf"student_logits shape \(4, {VS}\) does not match teacher_logits shape \(4, {VT}\): the teacher's "
               rf"vocabulary \(last dimension, {VT}\) is larger than the student's \({VS}\)\. Pass "
               rf"vocab_mismatch='truncate'")
    with pytest.raises(ValueError, match=pattern):
        kd_loss(s, t, y)
    with pytest.raises(ValueError, match="vocab_mismatch='truncate'"):
        kd_loss_reference(s, t, y)
    with pytest.raises(ValueError, match="vocab_mismatch='truncate'"):
        KDLoss()(s, t, y)


@pytest.mark.parametrize("vocab_mismatch", ["error", "truncate"])
def test_smaller_teacher_vocabulary_raises(vocab_mismatch):
    s, t, y = make_logits(4, VT), make_logits(4, VS), make_target(4, VS)
    pattern = (rf"student_logits shape \(4, {VT}\) does not match teacher_logits shape \(4, {VS}\): the teacher's "
               rf"vocabulary \(last dimension, {VS}\) is smaller than the student's \({VT}\).*pad teacher_logits "
               rf"with -inf")
    with pytest.raises(ValueError, match=pattern):
        kd_loss(s, t, y, vocab_mismatch=vocab_mismatch)


def test_labels_must_be_student_ids():
    s, t = make_logits(4, VS), make_logits(4, VT)
    y = torch.tensor([0, VS, 3, -100], device=DEVICE)  # VS is a teacher id, not a student id
    with pytest.raises(ValueError, match=rf"outside \[0, {VS}\).*\[{VS}\]"):
        kd_loss(s, t, y, vocab_mismatch="truncate")


def test_bad_vocab_mismatch_names_the_argument():
    s, t, y = make_logits(4, VS), make_logits(4, VS), make_target(4, VS)
    with pytest.raises(ValueError, match=r"vocab_mismatch must be one of \('error', 'truncate'\), got 'pad'"):
        kd_loss(s, t, y, vocab_mismatch="pad")
    with pytest.raises(ValueError, match="vocab_mismatch must be one of"):
        KDLoss(vocab_mismatch=None)


def test_leading_shapes_still_checked():
    with pytest.raises(ValueError, match=r"student_logits shape \(4, 10\) does not match teacher_logits shape "
                                         r"\(3, 12\): expected the same shape"):
        kd_loss(make_logits(4, 10), make_logits(3, 12), vocab_mismatch="truncate")
    with pytest.raises(ValueError, match="vocabulary dimension .* is 0"):
        kd_loss(make_logits(4, 0), make_logits(4, 12), vocab_mismatch="truncate")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_truncate_under_torch_compile(backend):
    torch._dynamo.reset()
    s, t, y = make_logits(9, VS), make_logits(9, VT), make_target(9, VS)

    def step(student, teacher, target):
        return kd_loss(student, teacher, target, temperature=2.0, vocab_mismatch="truncate", backend=backend)

    x1, x2 = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    out_c, out_e = torch.compile(step, fullgraph=True)(x1, t, y), step(x2, t, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(x1.grad, x2.grad)

