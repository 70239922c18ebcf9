"""Compile gate: every Triton kernel configuration the package launches, compiled for real GPUs, without a GPU.

The Triton interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy and accepts code the compiler rejects, and
it has no registers to run out of. This gate compiles with Triton's real compiler and its bundled ``ptxas``:

* it goes through the package's own path (``canonicalize`` → strided views → the launcher and its heuristics), so
  the configurations compiled are the ones a GPU call would launch, over a grid of shapes, dtypes, students,
  reductions, temperatures, teacher gradients and strided layouts (meta tensors: nothing is allocated), and the
  fused-linear loss's chunk launches (:class:`LinearCase`: its chunk loop on meta tensors, CUDA's default chunk);
* Triton is pointed at a compile-only driver (device 0, stream 0, the target architecture), and the launcher's
  launch is replaced by ``JITFunction.warmup``, which compiles and returns the kernel without running it;
* each compiled kernel's cubin is read with the bundled ``cuobjdump -res-usage``: registers, stack bytes (where
  spills go), local memory, and the shared memory from Triton's metadata.

It fails on any compile error and on any spilled byte. Run it as::

    python -m spacedkd_fast.kernels.compile_gate               # sm_90a, full grid; table + verdict
    python -m spacedkd_fast.kernels.compile_gate --arch 90 80 --json gate.json --jobs 2

It must run with the interpreter off (``triton.jit`` decides at import time), so the command clears
``TRITON_INTERPRET`` in the processes that compile; importing this module in an interpreter session and calling
:func:`run_gate` is refused with a clear error.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
LAYOUTS = ("contiguous", "row-slice", "transposed", "time-shift")


@dataclass(frozen=True)
class Case:
    """One kd_loss call of the grid: the shapes and options a user could pass."""

    n: int  # teacher rows
    v: int  # vocabulary
    k: int = 0  # students over one teacher; 0: a plain (N, V) student
    dtype: str = "float32"  # student dtype
    teacher_dtype: str | None = None  # None: as the student
    teacher_grad: bool = False
    temperature: float = 2.0
    alpha: float = 0.5
    reduction: str = "mean"
    target: bool = True
    layout: str = "contiguous"
    student_grad: bool = True  # False: a forward under no_grad (evaluation, a frozen student)
    topk: int = 0  # > 0: kd_loss_topk with a teacher of this many entries per row (k students and teacher dtype unused)
    tail: str = "renormalize"  # its tail policy
    index_dtype: str = "int64"  # its ids' dtype

    def label(self) -> str:
        parts = [f"{self.n}x{self.v}", self.dtype]
        if self.topk:
            parts.append(f"top-{self.topk}" + (" bucket" if self.tail == "bucket" else "")
                         + (f" {self.index_dtype} ids" if self.index_dtype != "int64" else ""))
        if self.k:
            parts.append(f"K={self.k}")
        if self.teacher_dtype and self.teacher_dtype != self.dtype:
            parts.append(f"teacher {self.teacher_dtype}")
        if self.teacher_grad:
            parts.append("teacher_grad")
        if self.temperature == 1.0:
            parts.append("T=1")
        if self.alpha in (0.0, 1.0):
            parts.append(f"alpha={self.alpha:g}")
        if self.reduction != "mean":
            parts.append(self.reduction)
        if not self.target:
            parts.append("no target")
        if self.layout != "contiguous":
            parts.append(self.layout)
        if not self.student_grad:
            parts.append("forward only")
        return " ".join(parts)


@dataclass(frozen=True)
class LinearCase:
    """One fused-linear call (``kd_loss_from_hidden``): its chunk loop launches the kd_loss kernel on C-row blocks of
    fp32 logits (the chunk logits are fp32 whatever the heads' dtype), C being CUDA's default chunk for V. ``n`` is a
    multiple of C (every launch the same) or below it (one shorter chunk: a batch's remainder)."""

    n: int  # rows
    v: int  # vocabulary
    hidden: int = 4096
    teacher_logits: str | None = None  # the dtype of given teacher logits; None: the teacher as hidden states
    reduction: str = "mean"
    teacher_grad: bool = False
    student_grad: bool = True
    none_backward: bool = False  # the "none" backward's recomputing pass (gradients of the rows)

    def label(self) -> str:
        parts = [f"fused-linear {self.n}x{self.hidden}->{self.v}"]
        if self.teacher_logits:
            parts.append(f"teacher {self.teacher_logits} logits")
        if self.reduction != "mean":
            parts.append(self.reduction)
        if self.teacher_grad:
            parts.append("teacher_grad")
        if not self.student_grad:
            parts.append("forward only")
        if self.none_backward:
            parts.append("none backward")
        return " ".join(parts)


def linear_cases() -> list[LinearCase]:
    """Fused-linear chunk launches at the LLM vocabularies: full chunks (n = 2 C) and a remainder (1000 and 1 rows),
    the teacher as hidden states or bf16 logits, every reduction's passes, the teacher's gradient; and a
    classification head (V = 1000: one chunk of all rows, the one-block path)."""
    cases = []
    for v in (32000, 50257, 128256):
        chunk = _linear_chunk(v)
        cases += [LinearCase(2 * chunk, v), LinearCase(1000, v), LinearCase(1, v),
                  LinearCase(2 * chunk, v, teacher_logits="bfloat16"),
                  LinearCase(2 * chunk, v, reduction="none"), LinearCase(2 * chunk, v, none_backward=True),
                  LinearCase(1000, v, none_backward=True), LinearCase(2 * chunk, v, teacher_grad=True)]
    cases += [LinearCase(2 * _linear_chunk(128256), 128256, teacher_logits="bfloat16", teacher_grad=True),
              LinearCase(2 * _linear_chunk(32000), 32000, student_grad=False),
              LinearCase(4096, 1000, hidden=512), LinearCase(4096, 1000, hidden=512, teacher_logits="bfloat16"),
              LinearCase(4096, 1000, hidden=512, none_backward=True)]
    return cases


def _linear_chunk(vocab: int) -> int:
    from spacedkd_fast.loss import fused_linear

    return fused_linear.chunk_rows(1 << 30, vocab, fused_linear.CUDA_CHUNK_BYTES)


def gate_cases(quick: bool = False) -> list[Case | LinearCase]:
    """The grid: N from 1 to 8192, V from 2 to 128256 (odd and non-multiple-of-16 sizes included), three dtypes,
    then K students, teacher gradients, T = 1, every reduction, no target and strided layouts on a subset."""
    rows = (1, 7, 128, 1000, 4096, 8192) if not quick else (1, 128, 4096)
    vocab = (2, 10, 100, 1000, 1001, 4096, 32000, 50257, 128256) if not quick else (10, 100, 1001, 32000, 128256)
    cases = [Case(n, v, dtype=d) for n in rows for v in vocab for d in DTYPES]
    some = [(128, 100), (1000, 1001), (4096, 1000), (8192, 32000), (1, 128256)]
    if not quick:
        some += [(7, 10), (8192, 2), (1024, 100), (256, 1000), (8192, 128256)]
    for n, v in some:
        for d in ("float32", "bfloat16"):
            cases += [
                Case(n, v, dtype=d, teacher_grad=True),
                Case(n, v, dtype=d, temperature=1.0),
                Case(n, v, dtype=d, temperature=1.0, teacher_grad=True),
                Case(n, v, dtype=d, reduction="sum"),
                Case(n, v, dtype=d, reduction="none"),
                Case(n, v, dtype=d, target=False),
                Case(n, v, dtype=d, target=False, teacher_grad=True, reduction="none"),
                Case(n, v, dtype=d, alpha=0.0),
                Case(n, v, dtype=d, alpha=1.0),
                Case(n, v, dtype=d, layout="row-slice"),
                Case(n, v, dtype=d, layout="transposed"),
                Case(n, v, dtype=d, layout="time-shift"),
            ]
        for k in (2, 3, 4, 8):
            cases.append(Case(n, v, k=k, dtype="float32"))
        cases += [Case(n, v, k=3, dtype="bfloat16", teacher_grad=True, temperature=1.0),
                  Case(n, v, k=4, dtype="float16", reduction="none"),
                  Case(n, v, dtype="bfloat16", teacher_dtype="float32"),
                  Case(n, v, dtype="float16", teacher_dtype="float16", teacher_grad=True)]
    # Forward only (no gradient written: evaluation under no_grad), on every launch path.
    for n, v in ((128, 10), (128, 100), (1000, 1001), (8192, 32000), (8192, 128256)):
        for d in ("float32", "bfloat16"):
            cases += [Case(n, v, dtype=d, student_grad=False), Case(n, v, dtype=d, student_grad=False,
                                                                       reduction="none")]
    # Column-strided logits whose largest offset passes 2^31: 64-bit column offsets.
    cases += [Case(32768, 128256, dtype="bfloat16", layout="transposed"),
              Case(20000, 131072, dtype="float32", layout="transposed", teacher_grad=True)]
    cases += linear_cases() if not quick else linear_cases()[:8]
    cases += topk_gate_cases(quick)
    return list(dict.fromkeys(cases))  # unique, in order


def topk_gate_cases(quick: bool = False) -> list[Case]:
    """The top-k teacher kernel (kd_loss_topk): one-block and streamed rows, k from 1 to 256, both tail policies,
    then T = 1, every reduction, no target, forward only, int32 ids and 64-bit column offsets on a subset."""
    rows = (1, 4096) if quick else (1, 128, 4096, 8192)
    vocab = (10, 1001, 32000, 128256) if quick else (10, 100, 1001, 4096, 32000, 128256)
    cases = [Case(n, v, dtype=d, topk=min(k, v), tail=tail) for n in rows for v in vocab for k in (1, 64, 256)
             for d in ("float32", "bfloat16") for tail in ("renormalize", "bucket")]
    for n, v in ((128, 100), (4096, 1001), (8192, 32000), (1, 128256), (8192, 128256)):
        k = min(64, v)
        for tail in ("renormalize", "bucket"):
            cases += [Case(n, v, dtype="float16", topk=k, tail=tail),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, temperature=1.0),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, reduction="none"),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, reduction="sum", alpha=1.0),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, alpha=0.0),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, target=False),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, student_grad=False),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, index_dtype="int32"),
                      Case(n, v, dtype="bfloat16", topk=k, tail=tail, layout="row-slice")]
    cases += [Case(32768, 128256, dtype="bfloat16", layout="transposed", topk=256),
              Case(32768, 128256, dtype="bfloat16", layout="transposed", topk=256, tail="bucket")]
    return cases


# ------------------------------------------------------------------------------------------------ compile-only
class CompileOnlyDriver:
    """What Triton's launch path asks the active driver, answered for a GPU that is not there.

    The "device" is the architecture number: ``JITFunction`` keeps its kernels and its target per device, so
    each architecture gets caches of its own within one process.
    """

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return self.target.arch

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target

    def get_device_capability(self, device=0) -> tuple[int, int]:
        return divmod(self.target.arch, 10)


def _meta_logits(case: Case, shape: tuple[int, ...], dtype):
    """Logits of ``shape`` (…, N, V) on the meta device, laid out as ``case.layout`` asks."""
    import torch

    if case.layout == "contiguous":
        return torch.empty(shape, dtype=dtype, device="meta")
    if case.layout == "row-slice":  # a column slice of wider logits: row stride V + 3
        return torch.empty(shape[:-1] + (shape[-1] + 3,), dtype=dtype, device="meta")[..., : shape[-1]]
    if case.layout == "transposed":  # column-major rows: column stride N
        return torch.empty(shape[:-2] + (shape[-1], shape[-2]), dtype=dtype, device="meta").transpose(-1, -2)
    if case.layout == "time-shift":  # (B, T, V)[:, :-1]: rows split as B × T with a gap between sequences
        b = 2 if shape[-2] % 2 == 0 and shape[-2] > 1 else 1
        t = shape[-2] // b
        return torch.empty(shape[:-2] + (b, t + 1, shape[-1]), dtype=dtype, device="meta")[..., :-1, :]
    raise ValueError(f"unknown layout {case.layout!r}")


def _case_problem(case: Case):
    """``(student, teacher, target)`` meta tensors of the case (time-shift cases are (B, T, V))."""
    import torch

    dtype = getattr(torch, case.dtype)
    t_dtype = getattr(torch, case.teacher_dtype or case.dtype)
    s_shape = ((case.k,) if case.k else ()) + (case.n, case.v)
    student = _meta_logits(case, s_shape, dtype)
    teacher = _meta_logits(case, (case.n, case.v), t_dtype)
    target = None
    if case.target:
        target = torch.empty(teacher.shape[:-1], dtype=torch.int64, device="meta")
    return student, teacher, target


def _launch_linear(case: LinearCase) -> None:
    """The fused-linear path of the case: argument checks and the chunk loop (meta tensors) with the Triton
    backend; a low-precision head's logits are fp32 there as on CUDA."""
    import torch

    from spacedkd_fast.loss import fused_linear
    from spacedkd_fast.loss.options import KDOptions

    def meta(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype, device="meta")

    options = KDOptions(temperature=2.0, alpha=0.5, label_smoothing=0.1, reduction=case.reduction,
                        teacher_grad=case.teacher_grad)
    teacher = meta(case.n, case.v, dtype=getattr(torch, case.teacher_logits)) if case.teacher_logits else meta(
        case.n, case.hidden)
    problem = fused_linear.canonicalize_linear(
        meta(case.n, case.hidden), meta(case.v, case.hidden), teacher,
        None if case.teacher_logits else meta(case.v, case.hidden), meta(case.n, dtype=torch.int64), None, None,
        options, _linear_chunk(case.v))
    teacher_side = case.teacher_grad
    wants = fused_linear.Grads(hidden=True, weight=True, bias=False, teacher=teacher_side,
                               teacher_weight=teacher_side and not case.teacher_logits, teacher_bias=False)
    if case.none_backward:
        fused_linear._run_chunks(problem, options.replace(reduction="none"), wants, "triton", False,
                                 row_weights=meta(case.n, dtype=torch.float32))
    else:
        forward_grads = case.student_grad and case.reduction != "none"  # "none" computes its gradients later
        fused_linear._run_chunks(problem, options, wants if forward_grads else fused_linear.NO_GRADS, "triton",
                                 False)


def _launch_topk_through_package(case: Case) -> None:
    """The package's path for a CUDA kd_loss_topk call of the case: options, checks, launcher."""
    import torch

    from spacedkd_fast.loss.function import run_triton_topk
    from spacedkd_fast.loss.options import KDOptions
    from spacedkd_fast.loss.sparse import SparseOptions, canonicalize_topk

    student = _meta_logits(case, (case.n, case.v), getattr(torch, case.dtype))
    indices = torch.empty((case.n, case.topk), dtype=getattr(torch, case.index_dtype), device="meta")
    values = torch.empty((case.n, case.topk), dtype=getattr(torch, case.dtype), device="meta")
    target = torch.empty((case.n,), dtype=torch.int64, device="meta") if case.target else None
    options = KDOptions(temperature=case.temperature, alpha=case.alpha, label_smoothing=0.1, ignore_index=-100,
                        reduction=case.reduction)
    sparse = SparseOptions(tail=case.tail, values="logprobs" if case.tail == "bucket" else "logits")
    problem = canonicalize_topk(student, indices, values, target, options)
    run_triton_topk(problem, options, sparse, case.student_grad)


def _launch_through_package(case: Case | LinearCase) -> None:
    """The package's own path for a CUDA call of the case: options, argument checks, strided views, launcher."""
    if isinstance(case, LinearCase):
        return _launch_linear(case)
    from spacedkd_fast.loss.args import canonicalize
    from spacedkd_fast.loss.function import run_triton
    from spacedkd_fast.loss.options import KDOptions

    if case.topk:
        _launch_topk_through_package(case)
        return
    student, teacher, target = _case_problem(case)
    if case.teacher_grad:
        teacher = teacher.requires_grad_(True)
    options = KDOptions(temperature=case.temperature, alpha=case.alpha, label_smoothing=0.1, ignore_index=-100,
                        reduction=case.reduction, teacher_grad=case.teacher_grad)
    problem = canonicalize(student, teacher, target, options)
    student4, teacher3 = problem.strided_views()
    run_triton(problem, student4, teacher3, options, case.student_grad, case.teacher_grad)


@dataclass
class Compiled:
    """One compiled kernel: its launch configuration and what the cubin uses."""

    arch: str
    kernel: str
    config: dict
    num_warps: int
    signature: str
    registers: int | None = None
    stack_bytes: int | None = None  # spills land here (Triton kernels have no local arrays)
    local_bytes: int | None = None
    shared_bytes: int = 0
    compile_s: float = 0.0
    cases: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def spill_bytes(self) -> int:
        return (self.stack_bytes or 0) + (self.local_bytes or 0)

    @property
    def ok(self) -> bool:
        return self.error is None and self.registers is not None and self.spill_bytes == 0


def _tool(name: str) -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"Triton's bundled {name} is missing ({path}); the compile gate needs it")
    return str(path)


_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def resource_usage(cubin: bytes) -> tuple[int, int, int]:
    """``(registers, stack bytes, local bytes)`` of the (single) kernel in ``cubin``, from ``cuobjdump``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", str(path)], capture_output=True, text=True,
                             timeout=120)
    match = _RES_USAGE.search(out.stdout)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"cuobjdump -res-usage failed ({out.returncode}): {out.stderr.strip() or out.stdout}")
    reg, stack, _, local = (int(g) for g in match.groups())
    return reg, stack, local


def _signature(args: Sequence, kwargs: dict) -> str:
    """What Triton specializes a compile on, besides the constexprs: tensor dtypes, ints equal to 1 or ÷16."""
    import torch

    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(str(a.dtype).removeprefix("torch."))
        elif isinstance(a, bool):
            parts.append(str(a))
        elif isinstance(a, int):
            parts.append("1" if a == 1 else ("d16" if a % 16 == 0 else "i"))
        else:
            parts.append("f")
    return ",".join(parts)


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_group(arch: int, cases: list[Case]) -> list[dict]:
    """Compile every case of a group in this process; one record per case."""
    from triton.runtime import driver

    from spacedkd_fast.kernels import kd_loss_launch

    previous = getattr(driver, "_active", None)  # reset_active() would create the real driver: none here
    driver.set_active(CompileOnlyDriver(arch))
    records = []
    try:
        for case in cases:
            captured: list = []

            def compile_only(kernel, grid, args, kwargs, captured=captured):
                started = time.perf_counter()
                compiled = kernel.warmup(*args, grid=grid, **kwargs)
                captured.append((compiled, kwargs, _signature(args, kwargs), time.perf_counter() - started))

            record = {"case": case.label()}
            try:
                with kd_loss_launch.launcher(compile_only):
                    _launch_through_package(case)
                compiled, kwargs, signature, seconds = captured[-1]
                config = {k: v for k, v in kwargs.items() if k not in ("num_warps", "maxnreg")}
                if compiled.metadata.target.arch != arch:
                    raise RuntimeError(f"compiled for {compiled.metadata.target}, expected sm_{arch}")
                record.update(hash=compiled.metadata.hash, kernel=compiled.metadata.name, config=config,
                              num_warps=kwargs["num_warps"], signature=signature, compile_s=seconds,
                              shared=compiled.metadata.shared, cubin=compiled.asm["cubin"])
            except Exception as exc:  # noqa: BLE001 - every failure is reported, with its case
                record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc) else ''}"
            records.append(record)
    finally:
        driver.set_active(previous)
    return records


def _group_key(case: Case) -> tuple:
    """Cases that should compile to the same kernel (compiled by one worker, so repeats are cache hits)."""
    from spacedkd_fast.kernels import kd_loss_launch

    seen: list = []
    with kd_loss_launch.launcher(lambda kernel, grid, args, kwargs: seen.append(
            (tuple(sorted(kwargs.items())), _signature(args, kwargs)))):
        try:
            _launch_through_package(case)
        except Exception as exc:  # noqa: BLE001 - reported when the case is compiled
            return ("error", repr(exc))
    return seen[-1] if seen else ("none",)


@dataclass
class GateReport:
    kernels: list[Compiled]
    failures: list[tuple[str, str, str]]  # (arch, case, error)
    cases: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.failures and all(k.ok for k in self.kernels)

    def to_json(self) -> dict:
        return {"ok": self.ok, "cases": self.cases, "seconds": round(self.seconds, 1),
                "failures": [dict(arch=a, case=c, error=e) for a, c, e in self.failures],
                "kernels": [{**dataclasses.asdict(k), "spill_bytes": k.spill_bytes, "ok": k.ok}
                            for k in self.kernels]}


def _check_interpreter_off() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("the compile gate compiles real kernels: run it without TRITON_INTERPRET=1 "
                           "(python -m spacedkd_fast.kernels.compile_gate clears it for you)")


def run_gate(cases: Iterable[Case], archs: Sequence[int] = (90,), jobs: int | None = None, log=None) -> GateReport:
    """Compile ``cases`` for each of ``archs``; group by expected kernel, spread the groups over ``jobs``
    processes, read each unique kernel's resource usage."""
    _check_interpreter_off()
    started = time.perf_counter()
    cases = list(cases)
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(_group_key(case), []).append(case)
    jobs = max(1, jobs or min(os.cpu_count() or 1, 8))
    work = [(arch, group) for arch in archs for group in groups.values()]
    records_by_arch: dict[int, list[dict]] = {arch: [] for arch in archs}
    if log:
        log(f"compile gate: {len(cases)} cases, {len(groups)} distinct launch configurations, archs "
            f"{', '.join(f'sm_{a}' for a in archs)}, {jobs} process(es)")
    if jobs == 1:
        for arch, group in work:
            records_by_arch[arch] += _compile_group(arch, group)
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init) as pool:
            futures = {pool.submit(_compile_group, arch, group): arch for arch, group in work}
            for future in concurrent.futures.as_completed(futures):
                records_by_arch[futures[future]] += future.result()

    kernels: dict[tuple, Compiled] = {}
    failures = []
    for arch, records in records_by_arch.items():
        arch_name = f"sm_{arch}{'a' if arch >= 90 else ''}"
        for rec in records:
            if "error" in rec:
                failures.append((arch_name, rec["case"], rec["error"]))
                continue
            key = (arch, rec["hash"])
            entry = kernels.get(key)
            if entry is None:
                entry = Compiled(arch=arch_name, kernel=rec["kernel"], config=rec["config"],
                                 num_warps=rec["num_warps"], signature=rec["signature"], shared_bytes=rec["shared"],
                                 compile_s=rec["compile_s"])
                try:
                    entry.registers, entry.stack_bytes, entry.local_bytes = resource_usage(rec["cubin"])
                except Exception as exc:  # noqa: BLE001
                    entry.error = f"{type(exc).__name__}: {exc}"
                kernels[key] = entry
            entry.compile_s = max(entry.compile_s, rec["compile_s"])
            entry.cases.append(rec["case"])
    ordered = sorted(kernels.values(), key=lambda k: (k.arch, _config_text(k)))
    return GateReport(kernels=ordered, failures=failures, cases=len(cases) * len(archs),
                      seconds=time.perf_counter() - started)


_FLAGS = ("HAS_TARGET", "HAS_CE", "HAS_KD", "GRAD_S", "GRAD_T", "TEMP_IS_ONE", "MEAN", "COL64", "BUCKET")


def _path(k: Compiled) -> str:
    c = k.config
    path = "single-program" if c.get("SINGLE_PROGRAM") else ("one-block" if c.get("ONE_BLOCK") else "streaming")
    return f"top-k {path}" if "topk" in k.kernel else path


def _config_text(k: Compiled) -> str:
    c = k.config
    flags = "+".join(f.lower() for f in _FLAGS if c.get(f))
    if "topk" in k.kernel:
        return f"{_path(k)} {c.get('ROWS')}x{c.get('BV')} k{c.get('KB')} w{k.num_warps} {flags}"
    return f"{_path(k)} {c.get('ROWS')}x{c.get('KP')}x{c.get('BV')} w{k.num_warps} {flags}"


def format_table(report: GateReport, full: bool = False) -> str:
    """Markdown: one row per launch path, tile and dtype (or per compiled kernel with ``full``)."""
    lines = []
    if full:
        lines += ["| arch | configuration | dtypes (s, t) | registers | spill bytes | shared B | cases | example |",
                  "|---|---|---|---|---|---|---|---|"]
        for k in report.kernels:
            dtypes = ",".join(k.signature.split(",")[3:4] + k.signature.split(",")[9:10])
            lines.append(f"| {k.arch} | {_config_text(k)} | {dtypes} | {k.registers} | {k.spill_bytes} | "
                         f"{k.shared_bytes} | {len(k.cases)} | {k.cases[0]} |")
    else:
        lines += ["| arch | path | kernels | cases | registers | spill bytes | shared bytes | warps |",
                  "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[Compiled]] = {}
        for k in report.kernels:
            c = k.config
            path = _path(k) + (" + teacher grad" if c.get("GRAD_T") else "") + (" + bucket" if c.get("BUCKET")
                                                                                  else "")
            groups.setdefault((k.arch, path), []).append(k)
        for (arch, path), ks in sorted(groups.items()):
            regs = [k.registers or 0 for k in ks]
            warps = ", ".join(str(w) for w in sorted({k.num_warps for k in ks}))
            lines.append(f"| {arch} | {path} | {len(ks)} | {sum(len(k.cases) for k in ks)} | {min(regs)}–{max(regs)} "
                         f"| {max(k.spill_bytes for k in ks)} | ≤ {max(k.shared_bytes for k in ks)} | {warps} |")
    bad = [k for k in report.kernels if not k.ok]
    for k in bad:
        lines.append(f"\nSPILLS {k.spill_bytes} B ({k.registers} registers) {k.arch} {_config_text(k)}: "
                     f"{', '.join(k.cases[:3])}" if k.error is None else f"\nERROR {k.arch} {k.error}")
    for arch, case, error in report.failures:
        lines.append(f"\nCOMPILE ERROR {arch} {case}: {error}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spacedkd_fast.kernels.compile_gate",
                                     description="Compile every Triton kernel configuration for real GPU "
                                                 "architectures (no GPU needed); fail on errors or spills.")
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities (90 = sm_90a)")
    parser.add_argument("--quick", action="store_true", help="a smaller grid")
    parser.add_argument("--jobs", type=int, default=None, help="compiling processes (default: the CPU count)")
    parser.add_argument("--json", default=None, help="write the full report here")
    parser.add_argument("--full", action="store_true", help="one table row per compiled kernel")
    parser.add_argument("--only", choices=("all", "dense", "topk"), default="all",
                        help="the dense kernel's cases, the top-k kernel's, or both (default)")
    args = parser.parse_args(argv)
    if os.environ.pop("TRITON_INTERPRET", None) == "1" and "spacedkd_fast.kernels.kd_loss" in sys.modules:
        # triton.jit decided at import time: start again in a clean process.
        return subprocess.call([sys.executable, "-m", "spacedkd_fast.kernels.compile_gate", *(argv or sys.argv[1:])])
    cases = gate_cases(args.quick)
    if args.only != "all":
        cases = [c for c in cases if bool(getattr(c, "topk", 0)) == (args.only == "topk")]
    report = run_gate(cases, args.arch, args.jobs, log=print)
    print(format_table(report, full=args.full))
    n_spill = sum(1 for k in report.kernels if not k.ok)
    verdict = "OK, 0 bytes spilled" if report.ok else (
        f"FAILED ({len(report.failures)} compile errors, {n_spill} kernels spilling)")
    print(f"\ncompile gate: {len(report.kernels)} kernels from {report.cases} cases in {report.seconds:.0f} s: "
          f"{verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=1) + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
