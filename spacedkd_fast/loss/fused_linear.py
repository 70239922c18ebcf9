"""Fused-linear KD: the :func:`~spacedkd_fast.kd_loss` objective from hidden states and the output heads' weights,
chunked over rows so that the ``N × V`` logits never exist.

Per row ``i`` (the spec is :mod:`spacedkd_fast.loss.reference`, applied to these logits)::

    s_i = h_i · W_sᵀ + b_s        t_i = g_i · W_tᵀ + b_t   (or the given teacher logits)
    loss_i = (1 − α) · CE_ε(s_i, y_i) + α · c · KL(softmax(t_i/T) ‖ softmax(s_i/T))

How (one Python loop, whatever the backend):

1. the rows are cut into chunks of C rows (:func:`default_chunk_size`: C × V fp32 within a memory budget);
2. per chunk, the student (and teacher) logits by one matmul each into fp32 buffers reused by every chunk (fp32
   for bf16/fp16 heads too: cuBLAS multiplies them with an fp32 output on CUDA, the CPU multiplies an fp32 copy of
   the head; so the softmaxes see the products unrounded, which keeps ``q − p`` accurate when teacher ≈ student);
3. the package's fused loss kernel (:func:`spacedkd_fast.loss.function._forward`: C++ on CPU, Triton on CUDA, or
   the torch reference) writes the chunk's losses and the logit gradient ``dZ`` in one pass over the logits;
4. ``dH = dZ · W`` for the chunk's rows, ``dW += dZᵀ · H`` and ``db += Σ dZ`` accumulated in fp32 (float64 for
   float64 heads).

For ``"mean"`` and ``"sum"`` the forward computes every gradient (of the *sum*: a mean's 1 / (non-ignored rows of
the whole batch) is applied with ``grad_output``) and the backward only scales them, in place unless the graph is
retained. For ``"none"`` the per-row ``grad_output`` is only known in the backward, so the backward recomputes the
chunks with the rows weighted by it (twice the matmuls of the forward, no saved gradients).

Eager calls go through :class:`_FusedLinearKD` (``autograd.Function``); under ``torch.compile`` the same loop runs
as the custom ops ``spacedkd_fast::kd_loss_from_hidden`` (and ``..._backward`` for ``"none"``), whose fake
implementations let ``fullgraph=True`` trace through. The weights are ordinary inputs: their gradients land in
``weight.grad`` through autograd, where DDP's hooks find them as after ``F.linear``; nothing is kept between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from spacedkd_fast import backends
from spacedkd_fast.loss.args import FLOAT_DTYPES, KDProblem, check_target_values, flat_checked_target
from spacedkd_fast.loss.function import _forward, _take_saved_gradients, once_differentiable
from spacedkd_fast.loss.options import KDOptions

__all__ = ["FusedLinearKDLoss", "default_chunk_size", "kd_loss_from_hidden"]

# Chunk budgets, as C × V × 4 bytes (one fp32 logits block; the loop holds three such blocks: the student and
# teacher logits and the gradient). CUDA: big enough that the matmuls run at full speed and the chunk count stays
# small, and at most an eighth of the free memory. CPU: measured at N = 2048, H = 256, V = 16384 on 2 cores, the
# matmuls lose 25-40 % at 128-256-row chunks against 512 (C = 512 there: fwd+bwd within 10 % of the same matmuls on
# materialized logits, at a tenth of the eager path's memory).
CUDA_CHUNK_BYTES = 256 << 20
CPU_CHUNK_BYTES = 32 << 20


def _fail(exc_type: type[Exception], message: str):
    raise exc_type(f"kd_loss_from_hidden: {message}")


# ---- the problem -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LinearKDProblem:
    """A checked fused-linear call, in canonical 2-D shapes (N rows).

    Attributes:
        hidden: ``(N, Hs)`` student hidden states; ``weight`` ``(Vs, Hs)``; ``bias`` ``(Vs,)`` or None. One dtype.
        teacher: ``(N, Ht)`` teacher hidden states (with ``teacher_weight`` ``(Vt, Ht)``, ``teacher_bias``
            ``(Vt,)`` or None), or ``(N, Vt)`` teacher logits (``teacher_weight`` None).
        target: ``(N,)`` int64 labels or None.
        lead_shape: the callers' leading shape (``(N,)`` or ``(B, T)``): the shape of a ``"none"`` loss.
        chunk_size: rows per chunk.
    """

    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None
    teacher: Tensor | None
    teacher_weight: Tensor | None
    teacher_bias: Tensor | None
    target: Tensor | None
    lead_shape: tuple[int, ...]
    ignore_index: int
    chunk_size: int

    TENSORS = ("hidden", "weight", "bias", "teacher", "teacher_weight", "teacher_bias", "target")

    @property
    def num_rows(self) -> int:
        return math.prod(self.lead_shape)

    @property
    def teacher_is_hidden(self) -> bool:
        return self.teacher_weight is not None

    def tensors(self) -> tuple[Tensor | None, ...]:
        return tuple(getattr(self, name) for name in self.TENSORS)

    def with_tensors(self, *tensors: Tensor | None) -> LinearKDProblem:
        """The same problem over other tensors (None: a problem that holds none, kept across a backward)."""
        return dataclasses.replace(self, **dict(zip(self.TENSORS, tensors or (None,) * len(self.TENSORS))))


class Grads(NamedTuple):
    """Gradients of the fused-linear loss, one per differentiable input (None where not wanted), or, as ``wants``,
    which of them to compute (bools). In the loop the weight and bias gradients are fp32 accumulators (float64 for
    float64 heads); :func:`_finish` casts them to their inputs' dtypes."""

    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    teacher: Tensor | None = None
    teacher_weight: Tensor | None = None
    teacher_bias: Tensor | None = None


NO_GRADS = Grads(*(False,) * 6)


def _check_tensor(name: str, x) -> None:
    if not isinstance(x, Tensor):
        _fail(TypeError, f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        _fail(TypeError, f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got "
                         f"dtype {x.dtype}")


def _check_head(prefix: str, hidden: Tensor, hidden_name: str, weight, bias) -> int:
    """Check a (V, H) head (and its (V,) bias) against its hidden states; return V."""
    _check_tensor(f"{prefix}_weight", weight)
    if weight.dim() == 3 and prefix == "student":
        _fail(ValueError, f"student_weight has shape {tuple(weight.shape)}: K students (a (K, Vs, Hs) weight) are "
                          f"not supported by kd_loss_from_hidden; call it once per student")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        _fail(ValueError, f"{prefix}_weight shape {tuple(weight.shape)} does not match {hidden_name} shape "
                          f"{tuple(hidden.shape)}: expected the head's (V, H) weight with H = {hidden.shape[-1]}, "
                          f"the last dimension of {hidden_name}")
    if weight.dtype != hidden.dtype:
        _fail(TypeError, f"{prefix}_weight is {weight.dtype} but {hidden_name} is {hidden.dtype}: the head's "
                         f"matmul runs in one dtype (cast one of them)")
    if bias is not None:
        _check_tensor(f"{prefix}_bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            _fail(ValueError, f"{prefix}_bias shape {tuple(bias.shape)} does not match {prefix}_weight shape "
                              f"{tuple(weight.shape)}: expected ({weight.shape[0]},)")
        if bias.dtype != weight.dtype:
            _fail(TypeError, f"{prefix}_bias is {bias.dtype} but {prefix}_weight is {weight.dtype}")
    return weight.shape[0]


def canonicalize_linear(student_hidden, student_weight, teacher, teacher_weight, target, student_bias,
                        teacher_bias, options: KDOptions, chunk_size) -> LinearKDProblem:
    """Check every argument of a fused-linear call against the others and return the canonical problem.

    Raises:
        TypeError / ValueError naming the offending argument and what was expected, before any work is done.
    """
    _check_tensor("student_hidden", student_hidden)
    if student_hidden.dim() < 2:
        _fail(ValueError, f"student_hidden must be (N, Hs) or (B, T, Hs) hidden states, got shape "
                          f"{tuple(student_hidden.shape)}")
    lead_shape = tuple(student_hidden.shape[:-1])
    vs = _check_head("student", student_hidden, "student_hidden", student_weight, student_bias)
    if vs == 0:
        _fail(ValueError, f"student_weight has an empty vocabulary: shape {tuple(student_weight.shape)}")

    _check_tensor("teacher", teacher)
    if tuple(teacher.shape[:-1]) != lead_shape:
        what = "hidden states (N, Ht)" if teacher_weight is not None else "logits (N, Vt)"
        _fail(ValueError, f"teacher shape {tuple(teacher.shape)} does not match student_hidden shape "
                          f"{tuple(student_hidden.shape)}: expected teacher {what} with the leading shape "
                          f"{lead_shape}")
    if teacher_weight is None:
        if teacher_bias is not None:
            _fail(ValueError, "teacher_bias is given without teacher_weight: pass the teacher's hidden states with "
                              "its head (teacher_weight, teacher_bias), or its logits alone")
        vt = teacher.shape[-1]
    else:
        vt = _check_head("teacher", teacher, "teacher", teacher_weight, teacher_bias)
    if vt < vs:
        _fail(ValueError, f"the teacher's vocabulary ({vt}) is smaller than the student's ({vs}): every student "
                          f"token needs a teacher probability")
    if vt > vs:
        if options.vocab_mismatch != "truncate":
            _fail(ValueError, f"the teacher's vocabulary ({vt}) is larger than the student's ({vs}): pass "
                              f"vocab_mismatch='truncate' to restrict the teacher to the student's ids 0..{vs - 1} "
                              f"(renormalized over them; no copy), or give both the same vocabulary")
        # kd_loss's policy: the teacher's distribution over the student's ids, renormalized. Its head's first Vs
        # rows (or its logits' first Vs columns), as views: a teacher gradient reaches only those.
        if teacher_weight is None:
            teacher = teacher[..., :vs]
        else:
            teacher_weight = teacher_weight[:vs]
            teacher_bias = teacher_bias[:vs] if teacher_bias is not None else None
        vt = vs

    device = student_hidden.device
    for name, x in (("student_weight", student_weight), ("student_bias", student_bias), ("teacher", teacher),
                    ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias), ("target", target)):
        if isinstance(x, Tensor) and x.device != device:
            _fail(ValueError, f"{name} is on {x.device} but student_hidden is on {device}")

    flat_target = flat_checked_target(target, lead_shape, "student_hidden", tuple(student_hidden.shape), device,
                                      "student_hidden is")
    if flat_target is not None:
        flat_target = flat_target.to(torch.int64)

    n = math.prod(lead_shape)
    if chunk_size is None:
        chunk_size = default_chunk_size(n, vt, device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        _fail(TypeError, f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
    elif chunk_size <= 0:
        _fail(ValueError, f"chunk_size must be a positive number of rows (or None: chosen from memory), got "
                          f"{chunk_size}")
    return LinearKDProblem(
        hidden=student_hidden.reshape(n, student_hidden.shape[-1]), weight=student_weight, bias=student_bias,
        teacher=teacher.reshape(n, teacher.shape[-1]), teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        target=flat_target, lead_shape=lead_shape, ignore_index=options.ignore_index, chunk_size=chunk_size)


@torch.compiler.assume_constant_result  # a budget, not data: torch.compile bakes it in
def default_chunk_size(num_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk: :func:`chunk_rows` within :data:`CUDA_CHUNK_BYTES` (and 1/8 of the free memory) on CUDA,
    :data:`CPU_CHUNK_BYTES` elsewhere."""
    budget = CPU_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(CUDA_CHUNK_BYTES, free // 8)
    return chunk_rows(num_rows, vocab, budget)


def chunk_rows(num_rows: int, vocab: int, budget_bytes: int) -> int:
    """The most rows C with C × V × 4 bytes within ``budget_bytes``: a multiple of 64 when at least 64 (whole
    matmul tiles), at least 1, at most ``num_rows``."""
    rows = max(1, budget_bytes // (4 * max(vocab, 1)))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, num_rows))


# ---- the chunk loop ----------------------------------------------------------------------------------------------
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the low-precision and fp32 heads, float64 for float64: the dtype of the chunk logits, of the
    weight and bias gradient sums, and of the loss."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.cache
def _mixed_precision_matmul(device: torch.device) -> bool:
    """Whether ``torch.mm``/``addmm`` take bf16/fp16 operands with an fp32 output here: CUDA, torch >= 2.8 (its
    ``out_dtype``), compute capability >= 8 (cuBLAS's bf16)."""
    if device.type != "cuda":
        return False
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    return version >= (2, 8) and torch.cuda.get_device_capability(device)[0] >= 8


class _Head(NamedTuple):
    """One output head as the loop runs it. ``weight``/``bias`` may be fp32 copies of bf16/fp16 parameters (where
    there is no mixed-precision matmul: the CPU); ``hidden`` is converted chunk by chunk (``compute_dtype``)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    compute_dtype: torch.dtype  # of the matmul operands

    @classmethod
    def of(cls, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> _Head:
        if hidden.dtype in LOW_PRECISION and not _mixed_precision_matmul(hidden.device):
            return cls(hidden, weight.float(), None if bias is None else bias.float(), torch.float32)
        return cls(hidden, weight, bias, hidden.dtype)

    def rows(self, start: int, end: int) -> Tensor:
        return self.hidden[start:end].to(self.compute_dtype)

    def logits(self, h: Tensor, out: Tensor) -> Tensor:
        """``h · Wᵀ + b`` into ``out`` (fp32 for a low-precision head: the softmaxes see the product unrounded; a
        chunk buffer, so no allocation per chunk)."""
        if h.dtype == out.dtype:
            if self.bias is None:
                return torch.mm(h, self.weight.t(), out=out)
            return torch.addmm(self.bias, h, self.weight.t(), out=out)
        torch.mm(h, self.weight.t(), out_dtype=out.dtype, out=out)  # cuBLAS: bf16/fp16 in, fp32 out
        return out if self.bias is None else out.add_(self.bias)

    def backward(self, dz: Tensor, h: Tensor, row_weights: Tensor | None, d_hidden: Tensor | None,
                 d_weight: Tensor | None, d_bias: Tensor | None) -> None:
        """The backward of ``z = h · Wᵀ + b`` for one chunk from its logit gradient ``dz`` ``(C, V)``:
        ``d_hidden = dz · W`` (written), ``d_weight += dzᵀ · h`` and ``d_bias += Σ_rows dz`` (accumulated in fp32),
        each row weighted by ``row_weights`` ``(C,)`` when given (the ``"none"`` backward: weighting the C × H side
        costs V/H times less than weighting dz)."""
        if dz.dtype != self.compute_dtype:
            dz = dz.to(self.compute_dtype)  # mixed precision: the gradient GEMMs run on bf16/fp16 operands
        col = row_weights[:, None] if row_weights is not None else None
        if d_hidden is not None:
            if d_hidden.dtype == dz.dtype and col is None:
                torch.mm(dz, self.weight, out=d_hidden)
            else:  # a C × H temporary, weighted before it is rounded to the hidden states' dtype
                product = torch.mm(dz, self.weight)
                d_hidden.copy_(product if col is None else product.to(col.dtype).mul_(col))
        if d_weight is not None:
            _accumulate(d_weight, dz.t(), h if col is None else (h * col).to(h.dtype))
        if d_bias is not None:
            if col is None:
                d_bias.add_(dz.sum(0, dtype=d_bias.dtype))
            else:
                _accumulate(d_bias.unsqueeze(1), dz.t(), col.to(dz.dtype))


def _accumulate(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a · b`` with the sum kept in ``acc``'s dtype (fp32): never rounded to the operands' bf16/fp16."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:  # cuBLAS takes bf16/fp16 operands with an fp32 output (_mixed_precision_matmul)
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)


def _allocate_grads(problem: LinearKDProblem, wants: Grads) -> Grads:
    """Outputs of the loop: row gradients in their inputs' dtypes, uninitialized (every row is written); weight
    and bias accumulators zeroed, fp32 (float64 for float64 heads)."""
    def acc(x):
        return torch.zeros(x.shape, dtype=_accumulator_dtype(x.dtype), device=x.device)

    def rows(x):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)

    return Grads(
        hidden=rows(problem.hidden) if wants.hidden else None,
        weight=acc(problem.weight) if wants.weight else None,
        bias=acc(problem.bias) if wants.bias else None,
        teacher=rows(problem.teacher) if wants.teacher else None,
        teacher_weight=acc(problem.teacher_weight) if wants.teacher_weight else None,
        teacher_bias=acc(problem.teacher_bias) if wants.teacher_bias else None,
    )


def _run_chunks(problem: LinearKDProblem, options: KDOptions, wants: Grads, backend: str, allow_fallback: bool,
                row_weights: Tensor | None = None) -> tuple[Tensor, Tensor | None, Grads]:
    """The loop over row chunks.

    Args:
        wants: which gradients to compute (bools in a :class:`Grads`).
        backend: "triton", "cpp" or "torch" (the kernel run on each chunk's logits).
        row_weights: ``(N,)`` weights of the rows' gradients (the ``"none"`` backward's grad_output), or None for
            the forward: the gradients of the summed loss.

    Returns:
        ``(loss, inv_count, grads)``: the loss in fp32 (float64 for float64 inputs), ``(N,)`` for ``"none"``, a
        0-dim total for ``"sum"``, divided by the non-ignored rows for ``"mean"``; ``inv_count`` the 0-dim
        ``1 / max(non-ignored rows, 1)`` a mean's gradients still need (None otherwise); the gradients.
    """
    target, n, device = problem.target, problem.hidden.shape[0], problem.hidden.device
    student = _Head.of(problem.hidden, problem.weight, problem.bias)
    teacher = _Head.of(problem.teacher, problem.teacher_weight, problem.teacher_bias) \
        if problem.teacher_is_hidden else None
    loss_dtype = torch.float64 if torch.float64 in (problem.hidden.dtype, problem.teacher.dtype) else torch.float32
    grads = _allocate_grads(problem, wants)
    student_grad, teacher_grad = any(wants[:3]), any(wants[3:])
    # Rows' losses for "none" (and for the "none" backward, which ignores them); a chunk's sum otherwise.
    chunk_options = options.replace(reduction="none" if options.reduction == "none" or row_weights is not None
                                    else "sum", teacher_grad=teacher_grad)
    c = max(1, min(problem.chunk_size, n))
    z_s = torch.empty((c, problem.weight.shape[0]), dtype=_accumulator_dtype(problem.hidden.dtype), device=device)
    z_t = None if teacher is None else torch.empty((c, problem.teacher_weight.shape[0]),
                                                   dtype=_accumulator_dtype(problem.teacher.dtype), device=device)

    losses = []
    for start in range(0, n, c):
        end = min(start + c, n)
        rows = end - start
        h = student.rows(start, end)
        s_logits = student.logits(h, z_s[:rows])
        if teacher is not None:
            g = teacher.rows(start, end)
            t_logits = teacher.logits(g, z_t[:rows])
        else:
            t_logits = problem.teacher[start:end]
        chunk = KDProblem(student=s_logits, teacher=t_logits, target=None if target is None else target[start:end],
                          multi_student=False, lead_shape=(rows,), ignore_index=problem.ignore_index)
        loss, d_s, d_t = _forward(chunk, chunk_options, student_grad, teacher_grad, backend, allow_fallback)
        losses.append(loss)
        w = None if row_weights is None else row_weights[start:end]
        if student_grad:
            student.backward(d_s, h, w, None if grads.hidden is None else grads.hidden[start:end], grads.weight,
                             grads.bias)
        if teacher_grad:
            d_t = d_t[0]  # (1, rows, Vt): one student
            if teacher is not None:
                teacher.backward(d_t, g, w, None if grads.teacher is None else grads.teacher[start:end],
                                 grads.teacher_weight, grads.teacher_bias)
            elif w is None:
                grads.teacher[start:end].copy_(d_t)
            else:
                torch.mul(d_t, w[:, None], out=grads.teacher[start:end])
        del d_s, d_t  # the next chunk's gradient then reuses this one's buffer (the C++ kernel's pool)

    inv_count = None
    if options.reduction == "none":
        loss = torch.cat(losses).to(loss_dtype) if losses else torch.zeros(0, dtype=loss_dtype, device=device)
    else:
        loss = torch.stack(losses).to(loss_dtype).sum() if losses else torch.zeros((), dtype=loss_dtype,
                                                                                    device=device)
        if options.reduction == "mean":
            count = (target != problem.ignore_index).sum() if target is not None else torch.tensor(n, device=device)
            inv_count = 1.0 / count.clamp_min(1).to(loss_dtype)  # on the device: no host sync
            loss = loss * inv_count
    return loss, inv_count, grads


def _param_dtypes(problem: LinearKDProblem) -> tuple[torch.dtype | None, ...]:
    return tuple(None if x is None else x.dtype for x in problem.tensors()[:6])


def _finish(grads: Grads, scale: Tensor | None, dtypes, in_place: bool) -> tuple[Tensor | None, ...]:
    """The gradients times ``scale`` (0-dim: grad_output, times a mean's 1/count), in their inputs' dtypes."""
    # On CPU reading the scale is free, and loss.backward() of a sum seeds exactly 1: nothing to multiply then.
    unit = scale is None or (in_place and scale.device.type == "cpu" and scale.item() == 1.0)
    out = []
    for g, dtype in zip(grads, dtypes):
        if g is not None and not unit:
            g = g.mul_(scale) if in_place else g * scale
        out.append(None if g is None else g.to(dtype))
    return tuple(out)


# ---- eager: autograd.Function ------------------------------------------------------------------------------------
class _FusedLinearKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, teacher_weight, teacher_bias, problem, options, wants, backend,
                allow_fallback):
        ctx.options, ctx.wants, ctx.backend, ctx.allow_fallback = options, wants, backend, allow_fallback
        ctx.dtypes = _param_dtypes(problem)
        if options.reduction == "none":  # the backward recomputes the chunks with the rows' grad_output
            loss, _, _ = _run_chunks(problem, options, NO_GRADS, backend, allow_fallback)
            ctx.save_for_backward(*problem.tensors())
            ctx.problem = problem.with_tensors()
            ctx.grads = None
        else:
            loss, ctx.inv_count, ctx.grads = _run_chunks(problem, options, wants, backend, allow_fallback)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.options.reduction == "none":
            problem = ctx.problem.with_tensors(*ctx.saved_tensors)
            _, _, grads = _run_chunks(problem, ctx.options, ctx.wants, ctx.backend, ctx.allow_fallback,
                                      row_weights=grad_loss.reshape(-1))
            return _finish(grads, None, ctx.dtypes, in_place=True) + (None,) * 5
        grads, in_place = _take_saved_gradients(ctx, "kd_loss_from_hidden")
        scale = grad_loss if ctx.inv_count is None else grad_loss * ctx.inv_count
        return _finish(grads, scale, ctx.dtypes, in_place) + (None,) * 5


# ---- torch.compile: custom ops -----------------------------------------------------------------------------------
# Tensors and scalars only: the options travel as their fields, the problem as its tensors (rebuilt inside).
def _problem_of(hidden, weight, bias, teacher, teacher_weight, teacher_bias, target, ignore_index, chunk_size):
    return LinearKDProblem(hidden=hidden, weight=weight, bias=bias, teacher=teacher, teacher_weight=teacher_weight,
                           teacher_bias=teacher_bias, target=target, lead_shape=(hidden.shape[0],),
                           ignore_index=ignore_index, chunk_size=chunk_size)


def _options_of(temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad):
    return KDOptions.trusted(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                             ignore_index=ignore_index, reduction=reduction, t_squared=t_squared,
                             teacher_grad=teacher_grad)


@torch.library.custom_op("spacedkd_fast::kd_loss_from_hidden", mutates_args=())
def kd_loss_from_hidden_fused(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: Tensor, teacher_weight: Tensor | None,
    teacher_bias: Tensor | None, target: Tensor | None, temperature: float, alpha: float, label_smoothing: float,
    ignore_index: int, reduction: str, t_squared: bool, teacher_grad: bool, wants: list[bool], chunk_size: int,
    backend: str, allow_fallback: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Loss and saved gradients of one fused-linear call (arguments already checked, 2-D).

    Returns:
        ``(loss, inv_count, d_hidden, d_weight, d_bias, d_teacher, d_teacher_weight, d_teacher_bias)``: the loss
        (``(N,)`` for "none", else 0-dim); a mean's 0-dim ``1/count`` (else 1); the gradients of the summed loss
        (weights and biases as fp32 accumulators), empty where not asked for, and always empty for "none" (its
        backward recomputes them: :func:`kd_loss_from_hidden_backward`).
    """
    problem = _problem_of(hidden, weight, bias, teacher, teacher_weight, teacher_bias, target, ignore_index,
                          chunk_size)
    options = _options_of(temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad)
    loss, inv_count, grads = _run_chunks(problem, options, NO_GRADS if reduction == "none" else Grads(*wants),
                                         backend, allow_fallback)
    inv_count = inv_count if inv_count is not None else torch.ones((), dtype=loss.dtype, device=loss.device)
    return (loss, inv_count) + tuple(g if g is not None else hidden.new_empty(0) for g in grads)


_ACCUMULATED = (False, True, True, False, True, True)  # weight and bias gradients: fp32 accumulators


@kd_loss_from_hidden_fused.register_fake
def _(hidden, weight, bias, teacher, teacher_weight, teacher_bias, target, temperature, alpha, label_smoothing,
      ignore_index, reduction, t_squared, teacher_grad, wants, chunk_size, backend, allow_fallback):
    loss_dtype = torch.float64 if torch.float64 in (hidden.dtype, teacher.dtype) else torch.float32
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=loss_dtype)
    wants = [False] * 6 if reduction == "none" else wants
    grads = [x.new_empty(x.shape, dtype=_accumulator_dtype(x.dtype) if accumulated else x.dtype)
             if x is not None and wanted else hidden.new_empty(0)
             for x, wanted, accumulated in zip((hidden, weight, bias, teacher, teacher_weight, teacher_bias), wants,
                                               _ACCUMULATED)]
    return (loss, hidden.new_empty((), dtype=loss_dtype), *grads)


@torch.library.custom_op("spacedkd_fast::kd_loss_from_hidden_backward", mutates_args=())
def kd_loss_from_hidden_backward(
    grad_rows: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor | None, teacher: Tensor,
    teacher_weight: Tensor | None, teacher_bias: Tensor | None, target: Tensor | None, temperature: float,
    alpha: float, label_smoothing: float, ignore_index: int, t_squared: bool, teacher_grad: bool, wants: list[bool],
    chunk_size: int, backend: str, allow_fallback: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ``"none"`` backward: the chunks again, each row's gradient weighted by ``grad_rows`` ``(N,)``; the six
    gradients in their inputs' dtypes (empty where not asked for)."""
    problem = _problem_of(hidden, weight, bias, teacher, teacher_weight, teacher_bias, target, ignore_index,
                          chunk_size)
    options = _options_of(temperature, alpha, label_smoothing, ignore_index, "none", t_squared, teacher_grad)
    _, _, grads = _run_chunks(problem, options, Grads(*wants), backend, allow_fallback, row_weights=grad_rows)
    finished = _finish(grads, None, _param_dtypes(problem), in_place=True)
    return tuple(g if g is not None else hidden.new_empty(0) for g in finished)


@kd_loss_from_hidden_backward.register_fake
def _(grad_rows, hidden, weight, bias, teacher, teacher_weight, teacher_bias, target, temperature, alpha,
      label_smoothing, ignore_index, t_squared, teacher_grad, wants, chunk_size, backend, allow_fallback):
    tensors = (hidden, weight, bias, teacher, teacher_weight, teacher_bias)
    return tuple(x.new_empty(x.shape) if x is not None and w else hidden.new_empty(0)
                 for x, w in zip(tensors, wants))


def _setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    recompute = inputs[11] == "none"  # only "none"'s backward reads the inputs again
    ctx.save_for_backward(*(inputs[:7] if recompute else (None,) * 7), output[1], *output[2:])
    ctx.scalars = inputs[7:]  # temperature ... allow_fallback
    ctx.dtypes = tuple(None if x is None else x.dtype for x in inputs[:6])


def _compiled_backward(ctx, grad_loss, *_unused):
    saved = ctx.saved_tensors
    tensors, inv_count, grads = saved[:7], saved[7], saved[8:]
    (temperature, alpha, label_smoothing, ignore_index, reduction, t_squared, teacher_grad, wants, chunk_size,
     backend, allow_fallback) = ctx.scalars
    if grad_loss is None:
        return (None,) * 18
    if reduction == "none":
        finished = kd_loss_from_hidden_backward(grad_loss, *tensors, temperature, alpha, label_smoothing,
                                                ignore_index, t_squared, teacher_grad, wants, chunk_size, backend,
                                                allow_fallback)
        finished = [g if w else None for g, w in zip(finished, wants)]
    else:  # traced graphs never scale in place (the compiler owns the buffers)
        finished = _finish(Grads(*[g if w else None for g, w in zip(grads, wants)]), grad_loss * inv_count,
                           ctx.dtypes, in_place=False)
    return tuple(finished) + (None,) * 12


torch.library.register_autograd("spacedkd_fast::kd_loss_from_hidden", _compiled_backward,
                                setup_context=_setup_context)


# ---- dispatch ----------------------------------------------------------------------------------------------------
def linear_kd_loss(problem: LinearKDProblem, options: KDOptions, *, backend: str, allow_fallback: bool) -> Tensor:
    """Run a checked problem on ``backend`` with autograd; the loss in its public shape."""
    grad_on = torch.is_grad_enabled()

    def wanted(x: Tensor | None, teacher_side: bool) -> bool:
        return grad_on and x is not None and x.requires_grad and (options.teacher_grad or not teacher_side)

    wants = Grads(*(wanted(x, i >= 3) for i, x in enumerate(problem.tensors()[:6])))
    # Inputs whose gradient is not computed are detached, so autograd expects none from them (a frozen teacher).
    problem = problem.with_tensors(*(x.detach() if x is not None and not w else x
                                     for x, w in zip(problem.tensors()[:6], wants)), problem.target)
    if torch.compiler.is_compiling():
        loss = kd_loss_from_hidden_fused(
            *problem.tensors(), options.temperature, options.alpha, options.label_smoothing, options.ignore_index,
            options.reduction, options.t_squared, options.teacher_grad, list(wants), problem.chunk_size, backend,
            allow_fallback)[0]
    elif not any(wants):  # inference: no graph
        loss = _run_chunks(problem, options, NO_GRADS, backend, allow_fallback)[0]
    else:
        loss = _FusedLinearKD.apply(*problem.tensors()[:6], problem, options, wants, backend, allow_fallback)
    return loss.view(problem.lead_shape) if options.reduction == "none" else loss


# ---- public API --------------------------------------------------------------------------------------------------
def kd_loss_from_hidden(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher: Tensor,
    teacher_weight: Tensor | None = None,
    target: Tensor | None = None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    t_squared: bool = True,
    teacher_grad: bool = False,
    vocab_mismatch: str = "error",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor:
    """:func:`~spacedkd_fast.kd_loss` of ``student_hidden · student_weightᵀ + student_bias`` against the teacher,
    without materializing the logits: chunks of ``chunk_size`` rows at a time (module docstring).

    Args:
        student_hidden: ``(N, Hs)`` or ``(B, T, Hs)`` hidden states feeding the student's output head (any leading
            shape; float32, bfloat16, float16 or float64).
        student_weight: ``(Vs, Hs)`` head weight (``nn.Linear(Hs, Vs).weight``), the dtype of ``student_hidden``.
            Its gradient is accumulated in fp32 and returned in its dtype. K students are not supported.
        teacher: the teacher's hidden states ``(..., Ht)`` (with ``teacher_weight``) or its logits ``(..., Vt)``
            (without), with the student's leading shape. Logits that cannot be viewed as ``(N, Vt)`` rows (a
            time-shifted ``[:, :-1]`` view) are copied once.
        teacher_weight: ``(Vt, Ht)`` teacher head, or None when ``teacher`` holds logits. ``Vt < Vs`` raises;
            ``Vt > Vs`` raises unless ``vocab_mismatch="truncate"`` (as :func:`~spacedkd_fast.kd_loss`: the
            teacher restricted to the student's ids, renormalized; its head's first Vs rows, a view).
        target: integer labels of the leading shape (``(N,)`` or ``(B, T)``), or None for ``T²·KL`` alone.
        student_bias / teacher_bias: ``(V,)`` head biases, or None.
        temperature ... teacher_grad, vocab_mismatch: as :func:`~spacedkd_fast.kd_loss`. The teacher (its hidden
            states, head, or logits) is frozen unless ``teacher_grad=True``; then each teacher tensor that requires
            grad gets one.
        chunk_size: rows per chunk; None picks one from memory (:func:`default_chunk_size`: C × V fp32 about
            256 MiB on CUDA, 32 MiB on CPU). Peak extra memory is about three C × V fp32 logit blocks.
        backend: "auto" (Triton + cuBLAS on CUDA, the C++ kernel + torch matmul on CPU, the reference for
            float64), "triton", "cpp" or "torch" (the reference kernel on each chunk: same loop, same memory).

    Returns:
        fp32 loss (float64 for float64 inputs): ``()`` for mean/sum, the leading shape for none.

    Raises:
        TypeError / ValueError naming the argument: hidden sizes that do not match the weights, mixed dtypes
        between hidden states and their head, vocabularies that differ, labels of the wrong shape, tensors on
        different devices, ``chunk_size <= 0``, bad hyperparameters.
    """
    options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                        ignore_index=ignore_index, reduction=reduction, t_squared=t_squared,
                        teacher_grad=teacher_grad, vocab_mismatch=vocab_mismatch)
    return kd_loss_from_hidden_with(student_hidden, student_weight, teacher, teacher_weight, target, options,
                                    student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
                                    backend=backend)


def kd_loss_from_hidden_with(student_hidden: Tensor, student_weight: Tensor, teacher: Tensor,
                             teacher_weight: Tensor | None, target: Tensor | None, options: KDOptions, *,
                             student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                             chunk_size: int | None = None, backend: str = "auto") -> Tensor:
    """:func:`kd_loss_from_hidden` with its options as one checked value (what :class:`FusedLinearKDLoss` calls)."""
    backends.check_loss_backend(backend)
    problem = canonicalize_linear(student_hidden, student_weight, teacher, teacher_weight, target, student_bias,
                                  teacher_bias, options, chunk_size)
    dtype = torch.float64 if torch.float64 in (student_hidden.dtype, teacher.dtype) else student_hidden.dtype
    chosen = backends.select_loss_backend(backend, student_hidden.device, dtype)
    if problem.target is not None and chosen != "cpp":  # the C++ kernel checks each chunk's labels itself
        check_target_values(problem.target, student_weight.shape[0], options.ignore_index)
    return linear_kd_loss(problem, options, backend=chosen, allow_fallback=backend == "auto")


class FusedLinearKDLoss(nn.Module):
    """Module form of :func:`kd_loss_from_hidden`: the keyword arguments (checked at construction) are its
    settings; called as ``loss_fn(student_hidden, student_weight, teacher, teacher_weight=None, target=None,
    student_bias=None, teacher_bias=None)``. It holds no parameters: pass the heads' own (``lm_head.weight``).
    """

    def __init__(self, *, temperature: float = 1.0, alpha: float = 0.5, label_smoothing: float = 0.0,
                 ignore_index: int = -100, reduction: str = "mean", t_squared: bool = True,
                 teacher_grad: bool = False, vocab_mismatch: str = "error", chunk_size: int | None = None,
                 backend: str = "auto") -> None:
        super().__init__()
        self.options = KDOptions(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                                 ignore_index=ignore_index, reduction=reduction, t_squared=t_squared,
                                 teacher_grad=teacher_grad, vocab_mismatch=vocab_mismatch)
        backends.check_loss_backend(backend)
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)):
            _fail(TypeError, f"chunk_size must be a positive int or None, got {type(chunk_size).__name__}")
        if chunk_size is not None and chunk_size <= 0:
            _fail(ValueError, f"chunk_size must be a positive number of rows (or None: chosen from memory), got "
                              f"{chunk_size}")
        self.chunk_size, self.backend = chunk_size, backend

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher: Tensor,
                teacher_weight: Tensor | None = None, target: Tensor | None = None, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None) -> Tensor:
        return kd_loss_from_hidden_with(student_hidden, student_weight, teacher, teacher_weight, target,
                                        self.options, student_bias=student_bias, teacher_bias=teacher_bias,
                                        chunk_size=self.chunk_size, backend=self.backend)

    def extra_repr(self) -> str:
        fields = {f: getattr(self.options, f) for f in self.options.__dataclass_fields__}
        return ", ".join(f"{k}={v!r}" for k, v in {**fields, "chunk_size": self.chunk_size,
                                                     "backend": self.backend}.items())
