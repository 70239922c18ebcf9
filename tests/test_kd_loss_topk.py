"""kd_loss_topk: a sparse (top-k) teacher, on every backend, against float64 oracles.

* ``tail="renormalize"`` must equal the dense float64 ``kd_loss_reference`` with a teacher row that holds the top-k
  values at their ids and −inf elsewhere (a teacher −inf is probability 0: an exact oracle).
* ``tail="bucket"`` must equal an independent float64 computation of the coarsened (k + 1 outcomes) KL.

The Triton cases run with ``TRITON_INTERPRET=1 pytest -m triton tests/test_kd_loss_topk.py``.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, GRAD_TOL, LOSS_BACKENDS, LOSS_TOL, assert_close, make_logits

from spacedkd_fast import KDLossTopK, kd_loss_reference, kd_loss_topk, kd_loss_topk_reference

BACKENDS = LOSS_BACKENDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NEG_INF = float("-inf")


@pytest.fixture(params=["default_blocks", "small_blocks"])
def block_size(request, monkeypatch):
    """The Triton column block: the default (one block per row) or 16 (rows streamed through several blocks)."""
    if request.param == "small_blocks":
        from spacedkd_fast.kernels import launch

        monkeypatch.setattr(launch, "MAX_BLOCK_V", 16)
    return request.param


def topk_inputs(lead=(2, 6), v=40, k=8, dtype=torch.float32, seed=0, ignore_every=5):
    """``(student, teacher_dense, indices, logits, logprobs, target)``: the top-k of a dense teacher."""
    torch.manual_seed(seed)
    s = make_logits(*lead, v, dtype=dtype)
    t = torch.randn(*lead, v, device=DEVICE, dtype=torch.float64) * 3
    logprobs_full = F.log_softmax(t, dim=-1)
    values, idx = t.topk(k, dim=-1)
    # Shuffle the k entries: order must not matter.
    perm = torch.randperm(k, device=DEVICE)
    idx, values = idx[..., perm], values[..., perm]
    y = torch.randint(0, v, lead, device=DEVICE)
    if ignore_every:
        y.view(-1)[::ignore_every] = -100
    return s, t, idx, values.to(dtype), logprobs_full.gather(-1, idx).to(dtype), y


def dense_from_topk(idx, values, v):
    dense = torch.full(idx.shape[:-1] + (v,), NEG_INF, dtype=torch.float64, device=idx.device)
    return dense.scatter(-1, idx.long(), values.double())


def bucket_oracle(s64, idx, logprobs, y, *, temperature, alpha, label_smoothing=0.0, reduction="mean",
                  t_squared=True, ignore_index=-100):
    """The bucket policy written out independently, row by row, in float64."""
    v = s64.shape[-1]
    s2, i2, lp2 = s64.reshape(-1, v), idx.reshape(-1, idx.shape[-1]).long(), logprobs.reshape(-1, idx.shape[-1])
    y2 = y.reshape(-1) if y is not None else None
    rows = []
    for n in range(s2.shape[0]):
        if y2 is not None and y2[n] == ignore_index:
            rows.append(s2[n].sum() * 0)
            continue
        q = torch.softmax(s2[n] / temperature, dim=-1)
        in_k = torch.zeros(v, dtype=torch.bool, device=s64.device)
        in_k[i2[n]] = True
        q_ext = torch.cat([q[i2[n]], q[~in_k].sum().reshape(1)])
        big_p = lp2[n].double().exp()
        tail = (1 - big_p.sum()).clamp_min(0) if i2.shape[1] < v else torch.zeros((), dtype=torch.float64)
        if i2.shape[1] == v:
            q_ext, logits = q_ext[:-1], lp2[n].double()
        else:
            logits = torch.cat([lp2[n].double(), tail.log().reshape(1)])
        p = torch.softmax(logits / temperature, dim=-1)
        kl = (p * (p.log() - q_ext.log())).sum()
        c = temperature**2 if t_squared else 1.0
        if y2 is None:
            rows.append(c * kl)
            continue
        ce = F.cross_entropy(s2[n][None], y2[n][None], label_smoothing=label_smoothing)
        rows.append((1 - alpha) * ce + alpha * c * kl)
    out = torch.stack(rows).reshape(s64.shape[:-1])
    if reduction == "none":
        return out
    total = out.sum()
    if reduction == "mean":
        total = total / max(int((y2 != ignore_index).sum()) if y2 is not None else y2.numel(), 1)
    return total


def compare(backend, student, oracle, *args, grad_output=True, **options):
    """``kd_loss_topk(student, *args, **options)`` on ``backend`` against ``oracle(student as float64)``: loss and
    the student gradient, through a random upstream gradient."""
    s = student.detach().clone().requires_grad_(True)
    s64 = student.detach().double().requires_grad_(True)
    out = kd_loss_topk(s, *args, backend=backend, **options)
    ref = oracle(s64)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    rtol, atol = LOSS_TOL[student.dtype]
    assert_close(out, ref, rtol, atol * max(1.0, ref.detach().abs().max().item()), "loss")
    upstream = torch.randn(ref.shape, dtype=torch.float64, device=ref.device) if grad_output else torch.ones_like(ref)
    (out * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    assert s.grad.dtype == student.dtype and s.grad.shape == student.shape
    rtol, atol = GRAD_TOL[student.dtype]
    assert_close(s.grad, s64.grad, rtol, atol * max(s64.grad.abs().max().item(), 1e-30), "student grad")
    return out, ref


def renormalize_oracle(idx, values, y, **options):
    def oracle(s64):
        return kd_loss_reference(s64, dense_from_topk(idx, values, s64.shape[-1]), y, **options)
    return oracle


# ---- renormalize: the dense reference with −inf outside the top-k -------------------------------------------
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_renormalize_matches_dense_reference(backend, dtype, temperature, label_smoothing):
    s, _, idx, logits, _, y = topk_inputs(dtype=dtype)
    options = dict(temperature=temperature, alpha=0.6, label_smoothing=label_smoothing)
    compare(backend, s, renormalize_oracle(idx, logits, y, reduction="none", **options), idx, logits, y,
            reduction="none", **options)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_reduction_int32_ids_and_no_t_squared(backend, reduction, block_size):
    s, _, idx, logits, _, y = topk_inputs(lead=(3, 5), v=50, k=12)
    options = dict(temperature=2.0, alpha=0.3, reduction=reduction, t_squared=False)
    compare(backend, s, renormalize_oracle(idx, logits, y, **options), idx.int(), logits, y, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_target_and_logprobs_values(backend, block_size):
    """target=None: the KL term alone. Log-probabilities renormalize to the same teacher as the logits."""
    s, _, idx, logits, logprobs, _ = topk_inputs(v=33, k=5)
    out, _ = compare(backend, s, renormalize_oracle(idx, logits, None, temperature=3.0), idx, logprobs, None,
                     temperature=3.0, values="logprobs")
    same = kd_loss_topk(s, idx, logits, None, temperature=3.0, backend=backend)
    assert_close(out, same, 1e-5, 1e-5, "logits vs logprobs")


@pytest.mark.parametrize("k", ["one", "all"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_k_edge_cases(backend, k, block_size):
    v = 24
    s, t, idx, logits, _, y = topk_inputs(lead=(7,), v=v, k=1 if k == "one" else v)
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=0.1)
    compare(backend, s, renormalize_oracle(idx, logits, y, **options), idx, logits, y, **options)
    if k == "all":  # the whole teacher row: the dense loss itself
        ref = kd_loss_reference(s.double(), t, y, **options)
        assert_close(kd_loss_topk(s, idx, logits, y, backend=backend, **options), ref, 2e-5, 2e-5, "k = V")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignored_rows_may_hold_garbage_ids(backend):
    """Rows whose label is ignore_index give 0 and gradient 0, whatever their ids (out of range, repeated) hold."""
    s, _, idx, logits, _, y = topk_inputs(lead=(10,), v=30, k=4)
    idx, logits = idx.clone(), logits.clone()
    idx[0] = torch.tensor([0, 0, 99, -1])  # row 0 is ignored (ignore_every=5)
    logits[5] = float("nan")  # so is row 5
    x = s.clone().requires_grad_(True)
    rows = kd_loss_topk(x, idx, logits, y, backend=backend, reduction="none", temperature=2.0)
    rows.sum().backward()
    assert (rows[[0, 5]] == 0).all() and (x.grad[[0, 5]] == 0).all() and torch.isfinite(rows).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_teacher_entries_and_masked_student(backend):
    """A −inf teacher value is probability 0 (padding); teacher mass on a student −inf token gives +inf."""
    s, _, idx, logits, _, y = topk_inputs(lead=(6,), v=20, k=5, ignore_every=0)
    logits = logits.clone()
    logits[1, 3:] = NEG_INF  # row 1 has two real candidates
    s = s.clone()
    s[2, idx[2, 0]] = NEG_INF  # row 2: the student masks a teacher token
    options = dict(temperature=2.0, alpha=0.5)
    rows = kd_loss_topk(s, idx, logits, y, backend=backend, reduction="none", **options)
    ref = kd_loss_reference(s.double(), dense_from_topk(idx, logits, 20), y, reduction="none", **options)
    assert torch.isposinf(rows[2]) and torch.isposinf(ref[2])
    keep = torch.tensor([0, 1, 3, 4, 5])
    assert_close(rows[keep], ref[keep], 2e-5, 2e-5, "finite rows")


@pytest.mark.parametrize("layout", ["time-shift", "transposed"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_students(backend, layout):
    """A (B, T, V) student time-shifted (x[:, :-1]) or column-major rows, with (B, T−1, k) teachers."""
    s, _, idx, logits, _, y = topk_inputs(lead=(2, 6), v=30, k=5)
    if layout == "time-shift":
        s, idx, logits, y = s[:, :-1], idx[:, 1:], logits[:, 1:], y[:, 1:]
    else:
        s = s.reshape(12, 30).t().contiguous().t()
        idx, logits, y = idx.reshape(12, 5), logits.reshape(12, 5), y.reshape(12)
    assert not s.is_contiguous()
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=0.1, reduction="sum")
    compare(backend, s, renormalize_oracle(idx, logits, y, **options), idx, logits, y, **options)


# ---- bucket: the residual mass as one outcome ---------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_matches_coarsened_kl(backend, dtype, temperature, block_size):
    s, _, idx, _, logprobs, y = topk_inputs(lead=(2, 4), v=30, k=6, dtype=dtype)
    options = dict(temperature=temperature, alpha=0.7, label_smoothing=0.1)
    compare(backend, s, lambda s64: bucket_oracle(s64, idx, logprobs, y, **options), idx, logprobs, y,
            values="logprobs", tail="bucket", **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_edges(backend):
    """k = V: no tail (the dense KL at T); reduction none and target=None."""
    v = 16
    s, t, idx, _, logprobs, y = topk_inputs(lead=(5,), v=v, k=v, ignore_every=0)
    options = dict(temperature=2.0, alpha=0.5)
    out = kd_loss_topk(s, idx, logprobs, y, values="logprobs", tail="bucket", backend=backend, **options)
    assert_close(out, kd_loss_reference(s.double(), t, y, **options), 2e-5, 2e-5, "bucket, k = V")
    s, _, idx, _, logprobs, _ = topk_inputs(lead=(5,), v=v, k=3)
    compare(backend, s, lambda s64: bucket_oracle(s64, idx, logprobs, None, temperature=1.0, alpha=0.5,
                                                  reduction="none"),
            idx, logprobs, None, values="logprobs", tail="bucket", reduction="none")


def test_bucket_at_t1_is_the_exact_coarsened_kl():
    """At T = 1 bucket is KL between the teacher and the student both coarsened to K ∪ {rest} (float64 reference)."""
    s, t, idx, _, logprobs, _ = topk_inputs(lead=(4,), v=20, k=3, ignore_every=0, dtype=torch.float64)
    s64 = s
    out = kd_loss_topk_reference(s64, idx, logprobs.double(), None, values="logprobs", tail="bucket",
                                 reduction="none")
    p, q = torch.softmax(t, -1), torch.softmax(s64, -1)
    in_k = torch.zeros_like(p, dtype=torch.bool).scatter(-1, idx, True)
    p2 = torch.cat([p.gather(-1, idx), (p * ~in_k).sum(-1, keepdim=True)], -1)
    q2 = torch.cat([q.gather(-1, idx), (q * ~in_k).sum(-1, keepdim=True)], -1)
    torch.testing.assert_close(out, (p2 * (p2.log() - q2.log())).sum(-1), rtol=1e-10, atol=1e-10)


# ---- dtypes, module, compile --------------------------------------------------------------------------------
def test_float64_stays_float64_and_gradcheck():
    s, _, idx, logits, _, y = topk_inputs(lead=(4,), v=9, k=3)
    s64 = s.double().requires_grad_(True)
    out = kd_loss_topk(s64, idx, logits.double(), y, temperature=2.0, label_smoothing=0.1)
    assert out.dtype == torch.float64
    assert torch.autograd.gradcheck(lambda x: kd_loss_topk(x, idx, logits.double(), y, temperature=2.0), (s64,))
    assert torch.autograd.gradcheck(lambda x: kd_loss_topk(x, idx, logits.double(), y, temperature=2.0,
                                                           values="logprobs", tail="bucket"), (s64,))


def test_module_checks_at_construction():
    with pytest.raises(ValueError, match="tail must be one of"):
        KDLossTopK(tail="spread")
    with pytest.raises(ValueError, match="tail='bucket' needs values='logprobs'"):
        KDLossTopK(tail="bucket")
    with pytest.raises(ValueError, match="temperature"):
        KDLossTopK(temperature=0.0)
    s, _, idx, logits, _, y = topk_inputs()
    loss_fn = KDLossTopK(temperature=2.0, alpha=0.5, backend="torch")
    assert torch.equal(loss_fn(s, idx, logits, y), kd_loss_topk(s, idx, logits, y, temperature=2.0,
                                                                backend="torch"))
    assert "renormalize" in repr(loss_fn)


def test_runs_under_torch_compile():
    """Under torch.compile the call is a clean graph break: it runs eagerly and gives the eager result."""
    s, _, idx, logits, _, y = topk_inputs(lead=(6,), v=20, k=4)

    @torch.compile(backend="eager")
    def step(x):
        return kd_loss_topk(x * 1.0, idx, logits, y, temperature=2.0) * 2.0

    x = s.clone().requires_grad_(True)
    out = step(x)
    out.backward()
    x2 = s.clone().requires_grad_(True)
    (kd_loss_topk(x2, idx, logits, y, temperature=2.0) * 2.0).backward()
    assert_close(out, kd_loss_topk(s, idx, logits, y, temperature=2.0) * 2.0, 1e-6, 1e-6, "compiled loss")
    assert_close(x.grad, x2.grad, 1e-6, 1e-6, "compiled grad")


# ---- bad input: one clear error naming the argument ---------------------------------------------------------
def _bad_cases():
    s, _, idx, logits, _, y = topk_inputs(lead=(4,), v=10, k=3, ignore_every=0)
    dup = idx.clone()
    dup[2, 1] = dup[2, 0]
    out_of_range = idx.clone()
    out_of_range[1, 2] = 10
    negative = idx.clone()
    negative[3, 0] = -2
    big = torch.arange(10).expand(4, 10)
    return [
        ("out of range", (s, out_of_range, logits, y), {}, ValueError, r"teacher_indices holds ids outside \[0, 10\)"),
        ("negative", (s, negative, logits, y), {}, ValueError, r"teacher_indices holds ids outside"),
        ("duplicated", (s, dup, logits, y), {}, ValueError, r"teacher_indices repeats an id within a row"),
        ("k > V", (s[:, :2], idx, logits, y), {}, ValueError, r"k = 3 entries per row, more than the vocabulary"),
        ("k > 256", (torch.randn(4, 300), torch.arange(257).expand(4, 257), torch.randn(4, 257), None), {},
         ValueError, r"at most 256"),
        ("shape mismatch", (s, idx, logits[:, :2], y), {}, ValueError,
         r"teacher_indices shape \(4, 3\) does not match teacher_values shape \(4, 2\)"),
        ("leading shape", (s[:3], idx, logits, None), {}, ValueError,
         r"teacher_indices shape \(4, 3\) does not match student_logits shape \(3, 10\)"),
        ("int values", (s, idx, idx, y), {}, TypeError, r"teacher_values must be a floating-point tensor"),
        ("float ids", (s, logits, logits, y), {}, TypeError, r"teacher_indices must be an int64 or int32"),
        ("k = 0", (s, idx[:, :0], logits[:, :0], y), {}, ValueError, r"k = 0"),
        ("bad label", (s, idx, logits, y.clone().fill_(10)), {}, ValueError, r"target holds labels outside"),
        ("bucket with logits", (s, idx, logits, y), {"tail": "bucket"}, ValueError, r"needs values='logprobs'"),
        ("values kind", (s, idx, logits, y), {"values": "probs"}, ValueError, r"teacher values must be one of"),
        ("meta device", (s, idx, logits.to("meta"), y), {}, ValueError,
         r"teacher_values is on meta but student_logits is on"),
        ("big k ok", (torch.randn(4, 10), big, torch.randn(4, 10), None), {}, None, None),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b.values[0] != "triton"])
def test_bad_input_raises_naming_the_argument(backend, case):
    _, args, kwargs, exc, pattern = case
    if exc is None:
        kd_loss_topk(*args, backend=backend, **kwargs)
        return
    with pytest.raises(exc, match=pattern):
        kd_loss_topk(*args, backend=backend, **kwargs)
