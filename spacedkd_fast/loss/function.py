"""The fused kd_loss with autograd: an ``autograd.Function`` in eager mode, a ``torch.library`` custom op under
``torch.compile``.

The forward launches the Triton or C++ kernel, which writes the loss *and* the gradients of the (reduced) loss in
the same pass over the logits. The backward only multiplies those saved gradients by ``grad_output`` (a scalar
per student, or one value per row for ``reduction="none"``), so it is exact for any upstream gradient, including
when the loss is not the last op.

Two entry points, one implementation (:func:`_forward`, :func:`_scaled_gradients`):

* eager calls go through :class:`_FusedKDLoss` (``autograd.Function``): a few microseconds of host work, where
  the custom-op dispatcher costs a couple of hundred, which at the paper's shape (128 × 100) is more than the math;
* under ``torch.compile`` the same forward runs as the custom op ``spacedkd_fast::kd_loss_fused``, whose fake
  implementation lets ``fullgraph=True`` trace through it.

The backward scales the saved gradient *in place* (no new allocation, no page faults) when autograd will not need
it again, i.e. when the graph is not being retained; on CPU a ``grad_output`` of exactly 1 (the usual
``loss.backward()``) skips the multiply altogether. With ``retain_graph=True`` it allocates, so a second backward
sees the same saved gradients.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from spacedkd_fast import backends
from spacedkd_fast.loss.args import KDProblem
from spacedkd_fast.loss.options import KDOptions

_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _graph_retained() -> bool:
    """Whether the running backward retains the graph (True when torch cannot tell: then never in place)."""
    if _keep_graph is None:
        return True
    try:
        return bool(_keep_graph())
    except RuntimeError:
        return True


def _problem(student: Tensor, teacher: Tensor, target: Tensor | None, ignore_index: int) -> KDProblem:
    multi = student.dim() == teacher.dim() + 1
    return KDProblem(student=student, teacher=teacher, target=target, multi_student=multi,
                     lead_shape=tuple(teacher.shape[:-1]), ignore_index=ignore_index)


def _output_shapes(problem: KDProblem, reduction: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    loss_shape = problem.none_shape if reduction == "none" else problem.reduced_shape
    grad_t_shape = (problem.num_students, *problem.teacher.shape)
    return loss_shape, grad_t_shape


def _run_cpp(problem: KDProblem, student4, teacher3, options: KDOptions, grad_student, grad_teacher):
    from spacedkd_fast import _C

    target = problem.target
    if target is not None and target.dtype != torch.int64:
        target = target.to(torch.int64)
    ce_weight, kd_weight = options.weights(target is not None)
    # The kernel counts the non-ignored rows, reduces the loss and checks the labels itself (free on CPU).
    return _C.kd_loss_forward(student4, teacher3, target, options.temperature, ce_weight, kd_weight,
                              options.label_smoothing, options.ignore_index, options.reduction, grad_student,
                              grad_teacher)


def run_triton(problem: KDProblem, student4, teacher3, options: KDOptions, grad_student, grad_teacher):
    """The Triton launcher with the options as its scalars (the compile gate launches through here too)."""
    from spacedkd_fast.kernels import kd_loss_forward

    ce_weight, kd_weight = options.weights(problem.target is not None)
    return kd_loss_forward(
        student4, teacher3, problem.target, temperature=options.temperature, ce_weight=ce_weight,
        kd_weight=kd_weight, label_smoothing=options.label_smoothing, ignore_index=options.ignore_index,
        reduction=options.reduction, grad_student=grad_student, grad_teacher=grad_teacher)


def _run_reference(problem: KDProblem, options: KDOptions, grad_student, grad_teacher):
    """The kernels' contract computed by the torch reference and autograd: the fallback when Triton fails to
    compile (float32, bfloat16 and float16 inputs only: float64 never reaches a kernel). Returns ``(loss (K,) or
    (K, N) float32, grad_student (K, N, V), grad_teacher (K, N, V))`` like the kernels."""
    from spacedkd_fast.loss.reference import kd_loss_rows_reference

    k, n, v = problem.num_students, problem.num_rows, problem.vocab
    with torch.enable_grad():
        student = problem.student_rows().detach().requires_grad_(grad_student)
        teacher = problem.teacher_rows().detach()
        if grad_teacher:  # one teacher copy per student: the kernels' per-student teacher gradients
            teacher = teacher.expand(k, n, v).clone().requires_grad_(True)
        loss = kd_loss_rows_reference(student, teacher, problem.target, options).float()  # (K, N)
        if options.reduction != "none":
            loss = loss.sum(dim=1)
            if options.reduction == "mean":
                loss = loss / problem.valid_count(torch.float32).clamp_min(1)
        inputs = [x for x, wanted in ((student, grad_student), (teacher, grad_teacher)) if wanted]
        grads = list(torch.autograd.grad(loss.sum(), inputs)) if inputs else []
    grad_s = grads.pop(0).to(problem.student.dtype) if grad_student else None
    grad_t = grads.pop(0).to(problem.teacher.dtype) if grad_teacher else None
    return loss.detach(), grad_s, grad_t


def _triton_compile_errors() -> tuple[type[BaseException], ...]:
    """Exception types Triton raises when a kernel fails to compile (not when it fails to run)."""
    errors: list[type[BaseException]] = []
    try:
        from triton.compiler.errors import CompilationError

        errors.append(CompilationError)
    except ImportError:  # pragma: no cover - a Triton without it
        pass
    try:
        from triton.runtime import errors as runtime_errors

        errors += [getattr(runtime_errors, name) for name in ("OutOfResources", "PTXASError")
                   if hasattr(runtime_errors, name)]
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _triton_or_reference(what: str, run_kernel, run_reference, allow_fallback: bool):
    """``run_kernel()`` (Triton); when the kernel fails to *compile* (a Triton/driver combination it does not
    support), ``run_reference()``, the torch reference computing the same contract, with one log line, and Triton
    is not tried again in this process (``backend="auto"``); an explicit ``backend="triton"`` raises instead.
    ``what`` names the loss in the messages (kd_loss, kd_loss_topk)."""
    try:
        return run_kernel()
    except _triton_compile_errors() as exc:
        # Triton's messages put the location first and the error last (with source lines between).
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        where_what = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
        reason = f"{type(exc).__name__}: {where_what}" if lines else type(exc).__name__
        backends.mark_triton_broken(reason)
        if not allow_fallback:
            raise RuntimeError(f"{what}: backend='triton' requested but the Triton kernel failed to compile "
                               f"({reason})") from exc
        backends.warn_once(f"triton-compile-{what}", f"the Triton {what} kernel failed to compile ({reason}); "
                                                      f"{what} uses the torch reference from now on")
        return run_reference()


def _forward(problem: KDProblem, options: KDOptions, grad_student: bool, grad_teacher: bool, backend: str,
             allow_fallback: bool):
    """``(loss, grad_student, grad_teacher)``: the loss in its public shape (fp32); the gradient of the reduced
    loss w.r.t. the student (its shape and dtype) or None; ``(K, *teacher.shape)`` per-student teacher gradients
    or None. ``backend``: "triton", "cpp" or "torch" (the reference computing the same contract)."""
    loss_shape, grad_t_shape = _output_shapes(problem, options.reduction)
    student, teacher = problem.student, problem.teacher
    if problem.num_rows == 0 or problem.num_students == 0:
        return (torch.zeros(loss_shape, dtype=torch.float32, device=student.device),
                torch.zeros_like(student) if grad_student else None,
                teacher.new_zeros(grad_t_shape) if grad_teacher else None)
    student4, teacher3 = problem.strided_views()
    if backend == "triton":
        loss, grad_s, grad_t = _triton_or_reference(
            "kd_loss", lambda: run_triton(problem, student4, teacher3, options, grad_student, grad_teacher),
            lambda: _run_reference(problem, options, grad_student, grad_teacher), allow_fallback)
    elif backend == "torch":  # the kernels' contract from the reference (the fused-linear loss's torch backend)
        loss, grad_s, grad_t = _run_reference(problem, options, grad_student, grad_teacher)
    else:
        loss, grad_s, grad_t = _run_cpp(problem, student4, teacher3, options, grad_student, grad_teacher)
    return (loss.view(loss_shape) if loss.shape != loss_shape else loss,
            (grad_s if grad_s.shape == student.shape else grad_s.view(student.shape)) if grad_student else None,
            grad_t.view(grad_t_shape) if grad_teacher else None)


def _scaled_gradients(grad_loss: Tensor, grad_s: Tensor | None, grad_t: Tensor | None, *, reduction: str,
                      multi: bool, teacher_dim: int, in_place: bool) -> tuple[Tensor | None, Tensor | None]:
    """The backward: the saved gradients times ``grad_loss`` (the loss's shape: ``(K?,)`` for mean/sum,
    ``(K?, *lead)`` for none), broadcast over V (and, for a reduced loss, over the rows).

    ``in_place``: the saved gradients are not needed again, so scale them where they are.
    """
    # On CPU reading grad_loss is free: loss.backward() seeds it with exactly 1, and then there is nothing to do.
    unit = in_place and grad_loss.device.type == "cpu" and (
        grad_loss.item() == 1.0 if grad_loss.numel() == 1 else bool((grad_loss == 1).all()))
    if unit and grad_t is None:
        return grad_s, None
    if reduction == "none":
        scale = grad_loss.unsqueeze(-1)
    else:
        scale = grad_loss.reshape(grad_loss.shape + (1,) * teacher_dim)

    def scaled(saved: Tensor, factor: Tensor) -> Tensor:
        if unit:
            return saved
        return saved.mul_(factor) if in_place else saved * factor

    d_student = scaled(grad_s, scale) if grad_s is not None else None
    d_teacher = None
    if grad_t is not None:
        # grad_t is (K, *teacher.shape): the teacher's gradient sums the K students' contributions.
        k_scale = scale if multi else scale.unsqueeze(0)
        if grad_t.shape[0] == 1:
            d_teacher = scaled(grad_t, k_scale)[0]
        else:
            d_teacher = (grad_t.float() * k_scale).sum(dim=0).to(grad_t.dtype)
    return d_student, d_teacher


def once_differentiable(backward):
    """``torch.autograd.function.once_differentiable``, without its cost in the usual backward: that wrapper runs
    the backward under ``no_grad`` and checks its outputs, which only matters when the backward itself is recorded
    (``create_graph=True``: a second derivative through it then raises, as it must). Outside that, grad mode is off
    already and the backward runs as it is (~2 µs a call, a share of a 128 × 100 loss)."""
    recorded = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *args):
        return recorded(ctx, *args) if torch.is_grad_enabled() else backward(ctx, *args)

    return wrapper


def _take_saved_gradients(ctx, what: str):
    """The gradients a Function's forward saved on ``ctx.grads``, and whether the backward may scale them in place:
    it may when autograd will not need them again (the graph is not retained), and then they are taken off ``ctx``
    (freed with the call). A second backward through a graph that was not retained raises, naming the loss."""
    if ctx.grads is None:
        raise RuntimeError(f"{what}: trying to backward through the graph a second time: its saved gradients were "
                           f"scaled in place and freed by the first backward. Specify retain_graph=True if you need "
                           f"to backward through the graph a second time.")
    grads = ctx.grads
    in_place = not _graph_retained()
    if in_place:
        ctx.grads = None
    return grads, in_place


# ---- eager: autograd.Function --------------------------------------------------------------------------------
class _FusedKDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, problem, options, grad_student, grad_teacher, backend, allow_fallback):
        loss, grad_s, grad_t = _forward(problem, options, grad_student, grad_teacher, backend, allow_fallback)
        ctx.grads = (grad_s, grad_t)  # plain attributes: not version-checked, freed with the graph
        ctx.reduction, ctx.multi, ctx.teacher_dim = options.reduction, problem.multi_student, teacher.dim()
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        (grad_s, grad_t), in_place = _take_saved_gradients(ctx, "kd_loss")
        d_student, d_teacher = _scaled_gradients(grad_loss, grad_s, grad_t, reduction=ctx.reduction,
                                                 multi=ctx.multi, teacher_dim=ctx.teacher_dim, in_place=in_place)
        return (d_student, d_teacher) + (None,) * 6


# ---- torch.compile: custom op --------------------------------------------------------------------------------
# A custom op's arguments are tensors and scalars, so the options travel as their fields, and are rebuilt inside
# (checked already: KDOptions.trusted).
@torch.library.custom_op("spacedkd_fast::kd_loss_fused", mutates_args=())
def kd_loss_fused(
    student: Tensor,
    teacher: Tensor,
    target: Tensor | None,
    temperature: float,
    alpha: float,
    label_smoothing: float,
    ignore_index: int,
    reduction: str,
    t_squared: bool,
    grad_student: bool,
    grad_teacher: bool,
    backend: str,
    allow_fallback: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Loss and saved gradients of one kd_loss call (arguments already checked).

    Args:
        student: ``(..., V)`` or ``(K, ..., V)``; teacher ``(..., V)``; target ``(N,)`` flattened labels or None.
        temperature ... t_squared: the fields of the call's :class:`~spacedkd_fast.loss.options.KDOptions`.
        backend: "triton" or "cpp".

    Returns:
        ``(loss, grad_student, grad_teacher)``, with empty tensors for the gradients not asked for.
    """
    options = KDOptions.trusted(temperature=temperature, alpha=alpha, label_smoothing=label_smoothing,
                                ignore_index=ignore_index, reduction=reduction, t_squared=t_squared)
    loss, grad_s, grad_t = _forward(_problem(student, teacher, target, ignore_index), options, grad_student,
                                    grad_teacher, backend, allow_fallback)
    return (loss, grad_s if grad_s is not None else student.new_empty(0),
            grad_t if grad_t is not None else teacher.new_empty(0))


@kd_loss_fused.register_fake
def _(student, teacher, target, temperature, alpha, label_smoothing, ignore_index, reduction, t_squared,
      grad_student, grad_teacher, backend, allow_fallback):
    problem = _problem(student, teacher, target, ignore_index)
    loss_shape, grad_t_shape = _output_shapes(problem, reduction)
    return (student.new_empty(loss_shape, dtype=torch.float32),
            student.new_empty(student.shape) if grad_student else student.new_empty(0),
            teacher.new_empty(grad_t_shape) if grad_teacher else teacher.new_empty(0))


def _setup_context(ctx, inputs, output):
    student, teacher = inputs[0], inputs[1]
    _, grad_s, grad_t = output
    ctx.mark_non_differentiable(grad_s, grad_t)
    ctx.set_materialize_grads(False)  # no zero tensors for the two non-differentiable outputs: backward is one mul
    ctx.save_for_backward(grad_s, grad_t)
    ctx.multi = student.dim() == teacher.dim() + 1
    ctx.teacher_dim = teacher.dim()
    ctx.reduction = inputs[7]
    ctx.has_grad_s = inputs[9]
    ctx.has_grad_t = inputs[10]


def _compiled_backward(ctx, grad_loss, _grad_s_unused, _grad_t_unused):
    grad_s, grad_t = ctx.saved_tensors
    if grad_loss is None:  # only the non-differentiable outputs were used
        return (None,) * 13
    # Traced graphs never scale in place (the compiler owns the buffers).
    d_student, d_teacher = _scaled_gradients(grad_loss, grad_s if ctx.has_grad_s else None,
                                             grad_t if ctx.has_grad_t else None, reduction=ctx.reduction,
                                             multi=ctx.multi, teacher_dim=ctx.teacher_dim, in_place=False)
    return (d_student, d_teacher) + (None,) * 11


torch.library.register_autograd("spacedkd_fast::kd_loss_fused", _compiled_backward, setup_context=_setup_context)


def fused_kd_loss(problem: KDProblem, options: KDOptions, *, backend: str, allow_fallback: bool = False) -> Tensor:
    """Run a checked problem through the Triton or C++ backend, with autograd."""
    grad_enabled = torch.is_grad_enabled()
    grad_student = grad_enabled and problem.student.requires_grad
    grad_teacher = grad_enabled and options.teacher_grad and problem.teacher.requires_grad
    # A teacher in a graph it gets no gradient from is detached (the Function must not hold that graph); the usual
    # teacher (computed under no_grad, or detached already) is passed as it is.
    teacher = problem.teacher.detach() if problem.teacher.requires_grad and not grad_teacher else problem.teacher
    if torch.compiler.is_compiling():
        loss, _, _ = kd_loss_fused(
            problem.student, teacher, problem.target, options.temperature, options.alpha, options.label_smoothing,
            options.ignore_index, options.reduction, options.t_squared, grad_student, grad_teacher, backend,
            allow_fallback)
        return loss
    if not (grad_student or grad_teacher):  # inference: no graph to build
        return _forward(problem, options, False, False, backend, allow_fallback)[0]
    if teacher is not problem.teacher:
        problem = _problem(problem.student, teacher, problem.target, problem.ignore_index)
    return _FusedKDLoss.apply(problem.student, teacher, problem, options, grad_student, grad_teacher, backend,
                              allow_fallback)


# ---- top-k teacher (spacedkd_fast/loss/sparse.py): the same forward-computes-the-gradient pattern ------------
def run_triton_topk(problem, options: KDOptions, sparse, grad_student: bool):
    """The Triton top-k launcher with the options as its scalars (the compile gate launches through here too)."""
    from spacedkd_fast.kernels.kd_loss_topk_launch import kd_loss_topk_forward

    ce_weight, kd_weight = options.weights(problem.target is not None)
    return kd_loss_topk_forward(
        problem.student_rows(), problem.indices, problem.values.detach(), problem.target,
        temperature=options.temperature, ce_weight=ce_weight, kd_weight=kd_weight,
        label_smoothing=options.label_smoothing, ignore_index=options.ignore_index, reduction=options.reduction,
        bucket=sparse.bucket, grad_student=grad_student)


def _run_cpp_topk(problem, options: KDOptions, sparse, grad_student: bool):
    from spacedkd_fast import _C

    target = problem.target
    if target is not None:
        target = target.to(torch.int64).contiguous()
    ce_weight, kd_weight = options.weights(target is not None)
    # The kernel counts the non-ignored rows and checks labels and id ranges itself (free on CPU).
    return _C.kd_loss_topk_forward(
        problem.student_rows(), problem.indices.to(torch.int64).contiguous(),
        problem.values.detach().to(torch.float32).contiguous(), target, options.temperature, ce_weight, kd_weight,
        options.label_smoothing, options.ignore_index, options.reduction, sparse.bucket, grad_student)


def _run_reference_topk(problem, options: KDOptions, sparse, grad_student: bool):
    """The kernels' contract by the torch reference and autograd (the fallback when Triton fails to compile)."""
    from spacedkd_fast.loss.sparse import reduce_topk_rows, topk_rows_reference

    with torch.enable_grad():
        student = problem.student_rows().detach().requires_grad_(grad_student)
        rows = topk_rows_reference(student, problem.indices, problem.values.detach(), problem.target, options,
                                   sparse).float()
        loss = reduce_topk_rows(rows, problem, options.reduction).reshape(-1 if options.reduction == "none" else ())
        grad = torch.autograd.grad(loss.sum(), student)[0].to(problem.student.dtype) if grad_student else None
    return loss.detach(), grad


def _forward_topk(problem, options: KDOptions, sparse, grad_student: bool, backend: str, allow_fallback: bool):
    """``(loss in its public shape, float32; the student gradient of the reduced loss in the student's shape, or
    None)``."""
    student = problem.student
    loss_shape = problem.lead_shape if options.reduction == "none" else ()
    if problem.num_rows == 0:
        return (torch.zeros(loss_shape, dtype=torch.float32, device=student.device),
                torch.zeros_like(student) if grad_student else None)
    if backend == "triton":
        loss, grad = _triton_or_reference(
            "kd_loss_topk", lambda: run_triton_topk(problem, options, sparse, grad_student),
            lambda: _run_reference_topk(problem, options, sparse, grad_student), allow_fallback)
    else:
        loss, grad = _run_cpp_topk(problem, options, sparse, grad_student)
    return loss.reshape(loss_shape), (grad.view(student.shape) if grad_student else None)


class _FusedKDLossTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, problem, options, sparse, backend, allow_fallback):
        loss, grad_s = _forward_topk(problem, options, sparse, True, backend, allow_fallback)
        ctx.grads = grad_s
        ctx.reduction, ctx.student_dim = options.reduction, student.dim()
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        grad_s, in_place = _take_saved_gradients(ctx, "kd_loss_topk")
        d_student, _ = _scaled_gradients(grad_loss, grad_s, None, reduction=ctx.reduction, multi=False,
                                         teacher_dim=ctx.student_dim, in_place=in_place)
        return (d_student,) + (None,) * 5


@torch.compiler.disable  # under torch.compile: a clean graph break, this call runs eagerly (no custom op yet)
def fused_kd_loss_topk(problem, options: KDOptions, sparse, *, backend: str, allow_fallback: bool = False) -> Tensor:
    """Run a checked top-k problem through the Triton or C++ backend, with autograd for the student."""
    if not (torch.is_grad_enabled() and problem.student.requires_grad):
        return _forward_topk(problem, options, sparse, False, backend, allow_fallback)[0]
    return _FusedKDLossTopK.apply(problem.student, problem, options, sparse, backend, allow_fallback)


__all__ = ["kd_loss_fused", "fused_kd_loss", "fused_kd_loss_topk", "run_triton", "run_triton_topk"]
