"""kd_loss_from_hidden / FusedLinearKDLoss against the float64 materialized reference,
``kd_loss_reference(h·Wᵀ + b, teacher logits, y)``: loss and the gradients of the hidden states, the head's weight
and bias (and the teacher's, with teacher_grad), on every backend, reduction, dtype and chunking; bad input; the
logits never materialized; torch.compile.

The C++ and torch backends run in the plain CPU test run; the Triton backend under ``TRITON_INTERPRET=1 pytest -m
triton`` (tiny shapes) or on a GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, LOSS_BACKENDS, assert_close

from spacedkd_fast import FusedLinearKDLoss, kd_loss_from_hidden, kd_loss_reference
from spacedkd_fast.loss import fused_linear

BACKENDS = LOSS_BACKENDS
CPU_BACKENDS = [b for b in BACKENDS if b.values[0] != "triton"]  # where a case adds nothing Triton-specific
OPTIONS = dict(temperature=2.0, alpha=0.3, label_smoothing=0.1)

# (rtol, atol relative to the largest reference value), against float64 on the same (exactly representable) inputs.
# The chunk logits are fp32 whatever the input dtype, so the loss is fp32-accurate for bf16/fp16 heads too; a
# low-precision gradient is rounded to its dtype once or twice (the bf16 logit gradient feeding cuBLAS on CUDA, the
# result): the contract is 1 % max relative error for bf16.
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 2e-5), torch.float16: (2e-5, 2e-5),
            torch.float64: (1e-6, 1e-6)}
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (1e-2, 4e-3), torch.float16: (2e-3, 1e-3),
            torch.float64: (1e-9, 1e-9)}


def make_case(lead=(37,), hs=16, ht=24, vocab=50, *, dtype=torch.float32, teacher="hidden", bias=True,
              target=True, ignore_every=4, teacher_bias=True, teacher_dtype=None):
    """Inputs of a fused-linear call: hidden states (lead, Hs), a head (V, Hs) (+ bias), the teacher as hidden states
    (lead, Ht) with its head, or as logits (lead, V), and labels with every ``ignore_every``-th row ignored."""
    teacher_dtype = teacher_dtype or dtype
    n = 1
    for d in lead:
        n *= d
    case = dict(
        student_hidden=torch.randn(*lead, hs, device=DEVICE).to(dtype),
        student_weight=(torch.randn(vocab, hs, device=DEVICE) / hs**0.5 * 2).to(dtype),
        student_bias=torch.randn(vocab, device=DEVICE).to(dtype) if bias else None,
        teacher_weight=None, teacher_bias=None, target=None)
    if teacher == "hidden":
        case["teacher"] = torch.randn(*lead, ht, device=DEVICE).to(teacher_dtype)
        case["teacher_weight"] = (torch.randn(vocab, ht, device=DEVICE) / ht**0.5 * 3).to(teacher_dtype)
        if teacher_bias:
            case["teacher_bias"] = torch.randn(vocab, device=DEVICE).to(teacher_dtype)
    else:
        case["teacher"] = (torch.randn(*lead, vocab, device=DEVICE) * 3).to(teacher_dtype)
    if target:
        y = torch.randint(0, vocab, (n,), device=DEVICE)
        if ignore_every:
            y[::ignore_every] = -100
        case["target"] = y.view(lead)
    return case


DIFFERENTIABLE = ("student_hidden", "student_weight", "student_bias", "teacher", "teacher_weight", "teacher_bias")


def reference(case: dict, **options):
    """The float64 materialized loss: logits by F.linear in float64, then the spec."""
    c = case
    s = F.linear(c["student_hidden"], c["student_weight"], c["student_bias"])
    t = c["teacher"] if c["teacher_weight"] is None else F.linear(c["teacher"], c["teacher_weight"],
                                                                  c["teacher_bias"])
    return kd_loss_reference(s, t, c["target"], **options)


def leaves(case: dict, dtype=None, teacher_grad=False):
    """Copies of the case's tensors (cast to ``dtype``) that collect their gradients."""
    out = {}
    for name, x in case.items():
        if x is None or name == "target":
            out[name] = x
            continue
        x = x.detach().clone() if dtype is None else x.detach().to(dtype)
        wants = name.startswith("student") or teacher_grad
        out[name] = x.requires_grad_(wants)
    return out


def check(case: dict, *, backend, reduction="mean", chunk_size=None, upstream=True, teacher_grad=False,
          **options):
    """Run ``backend`` and the float64 reference on the same values; compare the loss and every gradient."""
    options = {**options, "reduction": reduction, "teacher_grad": teacher_grad}
    ours = leaves(case, teacher_grad=teacher_grad)
    ref = leaves(case, torch.float64, teacher_grad=teacher_grad)
    out = kd_loss_from_hidden(**ours, chunk_size=chunk_size, backend=backend, **options)
    expected = reference(ref, **options)
    dtype = case["student_hidden"].dtype
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == expected.shape
    rtol, atol = LOSS_TOL[dtype]
    assert_close(out, expected, rtol, atol * max(1.0, expected.detach().abs().max().item()), "loss")
    grad = torch.randn(expected.shape, dtype=torch.float64, device=DEVICE) if upstream else torch.ones_like(expected)
    (out * grad.to(out.dtype)).sum().backward()
    (expected * grad).sum().backward()
    for name in DIFFERENTIABLE:
        x, x_ref = ours[name], ref[name]
        if x is None:
            continue
        if name.startswith("teacher") and not teacher_grad:
            assert x.grad is None, f"{name} got a gradient with teacher_grad=False"
            continue
        assert x.grad is not None and x.grad.dtype == x.dtype and x.grad.shape == x.shape, name
        rtol, atol = GRAD_TOL[x.dtype]
        assert_close(x.grad, x_ref.grad, rtol, atol * max(x_ref.grad.abs().max().item(), 1e-30), f"{name} grad")
    return out


# ---- against the reference --------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_and_teacher_kinds(backend, reduction, teacher):
    """N = 37 in chunks of 8 (the last one short), ignored rows, label smoothing, T = 2, a random grad_output."""
    check(make_case(teacher=teacher), backend=backend, reduction=reduction, chunk_size=8, **OPTIONS)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_without_target_is_kl_only(backend, reduction):
    check(make_case(target=False, bias=False), backend=backend, reduction=reduction, chunk_size=16,
          temperature=3.0, alpha=0.9)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hyperparameters(backend, temperature, alpha, label_smoothing):
    check(make_case(), backend=backend, chunk_size=10, temperature=temperature, alpha=alpha,
          label_smoothing=label_smoothing)


# Triton runs the two chunkings that split sequences (each size compiles kernels of its own on a GPU).
CHUNKINGS = [pytest.param(b.values[0], c, marks=b.marks, id=f"{b.values[0]}-{c}") for b in BACKENDS
             for c in (1, 5, 16, 1000, None) if b.values[0] != "triton" or c in (1, 5)]


@pytest.mark.parametrize("backend, chunk_size", CHUNKINGS)
def test_chunks_split_sequences(backend, chunk_size):
    """(B, T) = (3, 11) rows with padded sequence ends: chunks of 1, 5 (every chunk crosses a sequence), more
    than N, and the default; per-row losses keep the (B, T) shape."""
    case = make_case(lead=(3, 11))
    case["target"][0, 7:] = -100  # padding at a sequence end
    case["target"][2, 9:] = -100
    out = check(case, backend=backend, reduction="none", chunk_size=chunk_size, **OPTIONS)
    assert out.shape == (3, 11) and (out[case["target"] == -100] == 0).all()
    check(case, backend=backend, reduction="mean", chunk_size=chunk_size, **OPTIONS)


# Triton (the CUDA path: cuBLAS bf16 GEMMs with fp32 outputs) runs bf16; fp16 takes the same code.
LOW_PRECISION = [pytest.param(b.values[0], d, marks=b.marks, id=f"{b.values[0]}-{str(d).removeprefix('torch.')}")
                 for b in BACKENDS for d in (torch.bfloat16, torch.float16)
                 if b.values[0] != "triton" or d == torch.bfloat16]


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("backend, dtype", LOW_PRECISION)
def test_low_precision(backend, teacher, dtype):
    check(make_case(lead=(2, 19), hs=32, ht=40, vocab=300, dtype=dtype, teacher=teacher), backend=backend,
          reduction="mean", chunk_size=16, **OPTIONS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_teacher_close_to_student(backend):
    """KL alone (α = 1, T = 1) with the teacher's head 1 % away from the student's: the gradient q − p is small
    against the logits, so rounding the logits to bf16 would make it 20 % wrong (Liger #1432); the fp32 chunk
    logits keep it within the bf16 contract."""
    case = make_case(lead=(64,), hs=64, vocab=1000, dtype=torch.bfloat16, bias=False, ignore_every=0)
    case["teacher"] = case["student_hidden"]
    case["teacher_weight"] = (case["student_weight"].float()
                              + 0.01 * torch.randn_like(case["student_weight"].float())).bfloat16()
    case["teacher_bias"] = None
    check(case, backend=backend, chunk_size=16, temperature=1.0, alpha=1.0, upstream=False)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_float64_stays_float64(backend):
    if backend == "cpp":
        with pytest.raises(ValueError, match="float64"):
            kd_loss_from_hidden(**make_case(dtype=torch.float64), backend="cpp")
        return
    check(make_case(dtype=torch.float64), backend=backend, reduction="none", chunk_size=8, **OPTIONS)


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_grad(backend, reduction, teacher):
    """teacher_grad=True: the teacher's hidden states, head weight and bias (or its logits) get their gradients."""
    check(make_case(teacher=teacher), backend=backend, reduction=reduction, chunk_size=8, teacher_grad=True,
          **OPTIONS)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_teacher_head_frozen_by_default(backend):
    """A teacher nn.Linear whose parameters require grad gets none (nor do its hidden states) by default."""
    teacher_head = torch.nn.Linear(24, 50).to(DEVICE)
    case = make_case()
    g = case["teacher"].requires_grad_(True)
    case.update(teacher_weight=teacher_head.weight, teacher_bias=teacher_head.bias)
    case["student_hidden"].requires_grad_(True)
    kd_loss_from_hidden(**case, backend=backend, **OPTIONS).backward()
    assert teacher_head.weight.grad is None and teacher_head.bias.grad is None and g.grad is None
    assert case["student_hidden"].grad is not None


# ---- autograd: grad_output, nn.Linear parameters, retained graphs, no grad --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_land_on_nn_linear(backend):
    """The head is an nn.Linear: its weight.grad and bias.grad accumulate across calls like any layer's, through
    loss * 3 (not the last op), and an optimizer step uses them."""
    head = torch.nn.Linear(16, 50).to(DEVICE)
    case = make_case()
    h = case["student_hidden"].requires_grad_(True)
    kw = dict(teacher=case["teacher"], teacher_weight=case["teacher_weight"], teacher_bias=case["teacher_bias"],
              target=case["target"], chunk_size=8, backend=backend, **OPTIONS)
    (kd_loss_from_hidden(h, head.weight, student_bias=head.bias, **kw) * 3).backward()
    first = head.weight.grad.clone()
    kd_loss_from_hidden(h, head.weight, student_bias=head.bias, **kw).backward()  # accumulates: 3 + 1 = 4 times
    w64 = head.weight.detach().double().requires_grad_(True)
    b64 = head.bias.detach().double().requires_grad_(True)
    ref = reference({**{k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v)
                        for k, v in case.items()}, "student_weight": w64, "student_bias": b64}, **OPTIONS)
    (ref * 4).backward()
    assert_close(head.weight.grad, w64.grad, 1e-4, 1e-5 * w64.grad.abs().max().item(), "weight grad")
    assert_close(head.bias.grad, b64.grad, 1e-4, 1e-5 * b64.grad.abs().max().item(), "bias grad")
    assert_close(first * 4 / 3, w64.grad, 1e-4, 1e-5 * w64.grad.abs().max().item(), "first weight grad")
    before = head.weight.detach().clone()
    torch.optim.SGD(head.parameters(), lr=0.1).step()
    assert not torch.equal(before, head.weight.detach())


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_last_layer(backend):
    """Per-row and mean losses in one expression: each backward scales (or, for none, weights) its gradients by
    whatever flows back."""
    case = make_case(lead=(2, 9))
    grads = []
    for b, dtype in ((backend, None), ("torch", torch.float64)):
        x = leaves(case, dtype)
        per_row = kd_loss_from_hidden(**x, reduction="none", backend=b, chunk_size=4, **OPTIONS)
        mean = kd_loss_from_hidden(**x, backend=b, chunk_size=4, **OPTIONS)
        (per_row.square().sum() * 0.5 + 3.0 * mean - mean.exp()).backward()
        grads.append([x[name].grad.double() for name in DIFFERENTIABLE[:3]])
    for name, ours, ref in zip(DIFFERENTIABLE, *grads):
        assert_close(ours, ref, 1e-4, 1e-5 * ref.abs().max().item(), f"{name} grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_retain_graph_backward_twice(backend, reduction):
    x = leaves(make_case())
    loss = kd_loss_from_hidden(**x, reduction=reduction, backend=backend, chunk_size=8, **OPTIONS)
    upstream = torch.rand(loss.shape, device=DEVICE) + 0.5
    grads = []
    for retain in (True, True, False):
        x["student_weight"].grad = None
        loss.backward(upstream, retain_graph=retain)
        grads.append(x["student_weight"].grad.clone())
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward(upstream)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forward_only_under_no_grad(backend):
    x = leaves(make_case())
    with torch.no_grad():
        out = kd_loss_from_hidden(**x, backend=backend, chunk_size=8, **OPTIONS)
    assert not out.requires_grad
    assert_close(out, reference(leaves(make_case_like(x), torch.float64), **OPTIONS), 2e-5, 2e-5, "loss")


def make_case_like(x: dict) -> dict:
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in x.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_and_all_ignored(backend, reduction):
    for lead, ignore_all in (((0,), False), ((6,), True)):
        x = leaves(make_case(lead=lead))
        if ignore_all:
            x["target"].fill_(-100)
        out = kd_loss_from_hidden(**x, reduction=reduction, backend=backend, **OPTIONS)
        assert out.shape == ((lead[0],) if reduction == "none" else ())
        assert torch.equal(out, torch.zeros_like(out))
        out.sum().backward()
        for name in DIFFERENTIABLE[:3]:
            assert torch.equal(x[name].grad, torch.zeros_like(x[name])), name


def test_module_form_equals_the_function():
    loss_fn = FusedLinearKDLoss(chunk_size=8, **OPTIONS)
    case = make_case()
    assert torch.equal(loss_fn(case["student_hidden"], case["student_weight"], case["teacher"],
                               case["teacher_weight"], case["target"], student_bias=case["student_bias"],
                               teacher_bias=case["teacher_bias"]),
                       kd_loss_from_hidden(**case, chunk_size=8, **OPTIONS))
    assert "chunk_size=8" in repr(loss_fn) and "temperature=2.0" in repr(loss_fn)
    for kwargs, error, pattern in ((dict(alpha=2.0), ValueError, "alpha must be in"),
                                   (dict(chunk_size=0), ValueError, "chunk_size must be a positive"),
                                   (dict(chunk_size=2.5), TypeError, "chunk_size must be a positive int"),
                                   (dict(backend="gpu"), ValueError, "backend must be one of")):
        with pytest.raises(error, match=pattern):
            FusedLinearKDLoss(**kwargs)


# ---- torch.compile ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] == "cpp"])
def test_torch_compile_fullgraph(backend, reduction):
    """fullgraph=True traces through the custom op (and, for none, its recomputing backward op); the loss and the
    gradients equal eager's."""
    torch._dynamo.reset()
    head = torch.nn.Linear(16, 50).to(DEVICE)
    case = make_case(lead=(2, 9), teacher="logits")

    def step(h, teacher, y):
        out = kd_loss_from_hidden(h, head.weight, teacher, None, y, student_bias=head.bias, reduction=reduction,
                                  chunk_size=5, backend=backend, **OPTIONS)
        return (out * 2.0).sum() + 1.0

    results = []
    for fn in (torch.compile(step, fullgraph=True), step):
        head.zero_grad()
        h = case["student_hidden"].clone().requires_grad_(True)
        out = fn(h, case["teacher"], case["target"])
        out.backward()
        results.append((out.detach(), h.grad, head.weight.grad.clone(), head.bias.grad.clone()))
    for compiled, eager in zip(*results):
        torch.testing.assert_close(compiled, eager)


# ---- memory: the N × V logits never exist --------------------------------------------------------------------------
def test_no_tensor_of_the_full_logits_is_created():
    """Every tensor a torch op produces during forward and backward, the C++/Triton kernels' outputs included
    (they are returned through torch), is at most a chunk of the logits: rows × V with rows ≤ chunk_size."""
    from torch.utils._python_dispatch import TorchDispatchMode

    n, v, chunk = 256, 400, 32

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    x = leaves(make_case(lead=(n,), hs=16, ht=16, vocab=v))
    with Largest():
        loss = kd_loss_from_hidden(**x, chunk_size=chunk, **OPTIONS)
        loss.backward()
    assert Largest.largest <= chunk * v, (Largest.largest, chunk * v)
    # The same check sees the materialized path's logits.
    with Largest():
        reference(leaves(make_case(lead=(n,), hs=16, ht=16, vocab=v)), **OPTIONS).backward()
    assert Largest.largest >= n * v


_PEAK_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys, torch
    from spacedkd_fast import kd_loss, kd_loss_from_hidden
    from spacedkd_fast import _C

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    def peak_above_start(fn):
        fn()  # warm-up: torch's and the kernel's one-time allocations
        _C.release_cached_buffers()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        open("/proc/self/clear_refs", "w").write("5")  # the peak RSS restarts from the current RSS
        start = rss("VmRSS:")
        fn()
        return rss("VmHWM:") - start

    torch.manual_seed(0)
    n, hidden, vocab, chunk = 4096, 64, 8192, 128
    h = torch.randn(n, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / 8).requires_grad_(True)
    g, wt = torch.randn(n, hidden), torch.randn(vocab, hidden) / 8
    y = torch.randint(0, vocab, (n,))

    def fused():
        h.grad = w.grad = None
        kd_loss_from_hidden(h, w, g, wt, y, temperature=2.0, chunk_size=chunk).backward()

    def materialized():
        h.grad = w.grad = None
        kd_loss(h @ w.T, (g @ wt.T), y, temperature=2.0).backward()

    print(json.dumps({"fused": peak_above_start(fused), "materialized": peak_above_start(materialized),
                      "logits_bytes": n * vocab * 4, "chunk_bytes": chunk * vocab * 4}))
""")


@pytest.mark.skipif(sys.platform != "linux" or DEVICE != "cpu", reason="reads /proc/self (Linux, CPU tensors)")
def test_peak_memory_stays_at_chunk_scale():
    """Peak resident memory of forward + backward above what the process held before (in a fresh process, after
    trimming malloc and the kernel's buffer pool): the materialized path needs its 128 MiB logits several times
    over; the fused path about three 4 MiB chunks plus the weight gradient (2 MiB) and dH (1 MiB)."""
    from spacedkd_fast import backends

    if not backends.cpp_extension().available:
        pytest.skip("needs the C++ extension (the CPU kernel the fused path runs)")
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    assert peaks["materialized"] >= 2 * peaks["logits_bytes"], peaks  # the measurement sees the logits
    assert peaks["fused"] <= peaks["logits_bytes"] / 4, peaks
    assert peaks["fused"] <= peaks["materialized"] / 8, peaks


def test_default_chunk_size():
    cpu = torch.device("cpu")
    assert fused_linear.default_chunk_size(2048, 16384, cpu) == fused_linear.CPU_CHUNK_BYTES // (4 * 16384)
    assert fused_linear.default_chunk_size(10, 16384, cpu) == 10  # never more rows than there are
    assert fused_linear.default_chunk_size(100, 10**9, cpu) == 1  # at least one row
    assert fused_linear.default_chunk_size(10**6, 1000, cpu) % 64 == 0


# ---- bad input: clear errors naming the argument ------------------------------------------------------------------
def _bad(**changes):
    case = make_case(lead=(2, 5), hs=8, ht=6, vocab=10)
    case.update(changes)
    return case


@pytest.mark.parametrize("case, error, pattern", [
    (_bad(student_weight=torch.randn(10, 9)), ValueError,
     r"student_weight shape \(10, 9\) does not match student_hidden shape \(2, 5, 8\).*H = 8"),
    (_bad(student_weight=torch.randn(3, 10, 8)), ValueError, r"K students .* not supported"),
    (_bad(student_bias=torch.randn(11)), ValueError, r"student_bias shape \(11,\) does not match"),
    (_bad(teacher_weight=torch.randn(10, 7)), ValueError,
     r"teacher_weight shape \(10, 7\) does not match teacher shape \(2, 5, 6\)"),
    (_bad(teacher_weight=torch.randn(9, 6), teacher_bias=None), ValueError,
     r"teacher's vocabulary \(9\) is smaller than the student's \(10\)"),
    (_bad(teacher_weight=torch.randn(12, 6), teacher_bias=None), ValueError,
     r"teacher's vocabulary \(12\) is larger than the student's \(10\): pass vocab_mismatch"),
    (_bad(teacher=torch.randn(2, 5, 9), teacher_weight=None, teacher_bias=None), ValueError,
     r"teacher's vocabulary \(9\) is smaller"),
    (_bad(teacher=torch.randn(2, 5, 10), teacher_weight=None), ValueError, "teacher_bias is given without"),
    (_bad(teacher=torch.randn(2, 4, 6)), ValueError, r"teacher shape \(2, 4, 6\) does not match student_hidden"),
    (_bad(target=torch.zeros(10, dtype=torch.long)), ValueError,
     r"target shape \(10,\) does not match the leading shape \(2, 5\)"),
    (_bad(target=torch.zeros(2, 5)), TypeError, "target must be an integer tensor"),
    (_bad(target=torch.full((2, 5), 10)), ValueError, r"outside \[0, 10\)"),
    (_bad(student_weight=torch.randn(10, 8, dtype=torch.float64)), TypeError,
     "student_weight is torch.float64 but student_hidden is torch.float32"),
    (_bad(student_bias=torch.randn(10).bfloat16()), TypeError, "student_bias is torch.bfloat16"),
    (_bad(student_hidden=torch.randn(8)), ValueError, r"student_hidden must be \(N, Hs\) or \(B, T, Hs\)"),
    (_bad(student_hidden=torch.ones(2, 5, 8, dtype=torch.long)), TypeError, "student_hidden must be a floating"),
    (_bad(student_weight="lm_head"), TypeError, "student_weight must be a torch.Tensor"),
    (_bad(student_weight=torch.randn(10, 8, device="meta")), ValueError,
     "student_weight is on meta but student_hidden is on"),
    (_bad(target=torch.zeros(2, 5, dtype=torch.long, device="meta")), ValueError, "target is on meta"),
    (dict(_bad(), chunk_size=0), ValueError, r"chunk_size must be a positive number of rows .* got 0"),
    (dict(_bad(), chunk_size=-3), ValueError, "chunk_size must be a positive"),
    (dict(_bad(), chunk_size=True), TypeError, "chunk_size must be a positive int or None, got bool"),
    (dict(_bad(), temperature=0.0), ValueError, r"temperature must be in \(0, inf\)"),
    (dict(_bad(), reduction="batchmean"), ValueError, "reduction must be one of"),
    (dict(_bad(), backend="cuda"), ValueError, "backend must be one of"),
])
def test_bad_input_names_the_argument(case, error, pattern):
    with pytest.raises(error, match=pattern):
        kd_loss_from_hidden(**case)


def test_error_loses_nothing():
    x = leaves(make_case())
    before = {k: v.detach().clone() for k, v in x.items() if torch.is_tensor(v)}
    with pytest.raises(ValueError):
        kd_loss_from_hidden(**x, chunk_size=0)
    assert all(torch.equal(x[k].detach(), v) for k, v in before.items())
    assert all(x[k].grad is None for k in DIFFERENTIABLE if x[k] is not None)


# ---- DDP: the head's gradient is all-reduced like any parameter's -------------------------------------------------
_DDP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    import torch.distributed as dist
    from torch import nn
    from spacedkd_fast import kd_loss_from_hidden

    class Body(nn.Module):  # returns hidden states; the head is used by the loss, not by forward
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(40, 12)
            self.lm_head = nn.Linear(12, 40, bias=False)

        def forward(self, tokens):
            return torch.tanh(self.embed(tokens))

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = nn.parallel.DistributedDataParallel(Body())
    data = torch.load(sys.argv[1])
    rows = slice(rank * 4, rank * 4 + 4)  # this rank's half of the batch of 8 sequences
    loss = kd_loss_from_hidden(model(data["tokens"][rows]), model.module.lm_head.weight, data["teacher"][rows],
                               None, data["labels"][rows], temperature=2.0, alpha=0.5, chunk_size=5)
    loss.backward()
    torch.save({n: p.grad for n, p in model.module.named_parameters()}, sys.argv[2] + f".{rank}")
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="gloo on CPU tensors")
def test_ddp_all_reduces_the_head_gradient(tmp_path):
    """Two gloo ranks, each with half the batch: DDP's averaged gradients (of lm_head.weight, which only the loss
    uses, and of the body) equal one process's gradients of the whole batch."""
    from test_distributed import _finish, _start

    torch.manual_seed(1)
    data = {"tokens": torch.randint(0, 40, (8, 6)), "teacher": torch.randn(8, 6, 40),
            "labels": torch.randint(0, 40, (8, 6))}
    torch.save(data, tmp_path / "data.pt")
    script = tmp_path / "rank.py"
    script.write_text(_DDP_SCRIPT)
    results = _finish(_start([sys.executable, str(script), str(tmp_path / "data.pt"), str(tmp_path / "grads")]),
                      timeout=300)
    assert all(code == 0 for code, _, _ in results), results
    ranks = [torch.load(tmp_path / f"grads.{r}") for r in range(2)]

    namespace: dict = {}
    exec(_DDP_SCRIPT.split("dist.init_process_group")[0], namespace)  # the same Body, in this process
    body = namespace["Body"]()
    kd_loss_from_hidden(body(data["tokens"]), body.lm_head.weight, data["teacher"], None, data["labels"],
                        temperature=2.0, alpha=0.5).backward()
    for name, p in body.named_parameters():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: the ranks disagree"
        assert_close(ranks[0][name], p.grad, 1e-5, 1e-6, f"{name} grad")


# ---- a teacher vocabulary larger than the student's -----------------------------------------------------------
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_mismatch_truncate_is_kd_losss_policy(backend, teacher):
    """``vocab_mismatch="truncate"`` restricts a larger teacher vocabulary to the student's ids, as kd_loss does
    (its head's first Vs rows, or its logits' first Vs columns): the same loss and gradients as the float64
    reference on the materialized logits with kd_loss's truncation; with ``teacher_grad`` the dropped rows (or
    columns) get exactly 0. Without it a larger teacher vocabulary is refused, naming the option."""
    vs, vt = 40, 47
    case = make_case(lead=(3, 7), vocab=vt, teacher=teacher)
    for name in ("student_weight", "student_bias"):  # the student's head covers the first Vs ids
        case[name] = case[name][:vs].clone()
    case["target"] = torch.where(case["target"] >= vs, case["target"] % vs, case["target"])
    with pytest.raises(ValueError, match=r"larger than the student's \(40\): pass vocab_mismatch='truncate'"):
        kd_loss_from_hidden(**leaves(case), backend=backend)
    ours = leaves(case, teacher_grad=True)
    ref = leaves(case, torch.float64, teacher_grad=True)
    options = dict(OPTIONS, teacher_grad=True, vocab_mismatch="truncate")
    out = kd_loss_from_hidden(**ours, chunk_size=5, backend=backend, **options)
    expected = reference(ref, **options)
    assert_close(out, expected, 2e-5, 2e-5 * max(1.0, expected.abs().max().item()), "loss")
    out.backward()
    expected.backward()
    for name in DIFFERENTIABLE:
        if ours[name] is not None:
            assert_close(ours[name].grad, ref[name].grad, 1e-4, 1e-5 * ref[name].grad.abs().max().item(), name)
    dropped = ours["teacher"].grad[..., vs:] if teacher == "logits" else ours["teacher_weight"].grad[vs:]
    assert dropped.abs().max().item() == 0.0
