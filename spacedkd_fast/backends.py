"""Optional parts, probed once: CUDA, Triton (and its interpreter), the C++ extension, DALI (and this package's
DALI CPU operators, compiled on first use).

Nothing here fails on import. Each probe runs on first use and keeps the reason a part is missing, so
``python -m spacedkd_fast.info`` can print it. When a call would have used a missing part, the package falls
back and logs one line (once per part) on the ``spacedkd_fast`` logger.

Environment overrides:
    SPACEDKD_LOSS_BACKEND   force the backend that ``backend="auto"`` picks (triton | cpp | torch).
    SPACEDKD_DALI_FUSED     0: never build / use the fused DALI CPU operator (the stock DALI graph runs).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger("spacedkd_fast")

LOSS_BACKENDS = ("auto", "triton", "cpp", "torch")


@dataclass(frozen=True)
class Probe:
    """Whether an optional part is usable, and its version or the reason it is not."""

    available: bool
    detail: str

    def __str__(self) -> str:
        return f"{'yes' if self.available else 'no'} ({self.detail})"


def _import_probe(module: str, version_attr: str = "__version__") -> Probe:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - a broken install can raise anything
        return Probe(False, f"{type(exc).__name__}: {exc}".strip())
    return Probe(True, str(getattr(mod, version_attr, "available")))


@functools.cache
def cuda() -> Probe:
    if not torch.cuda.is_available():
        return Probe(False, "torch.cuda.is_available() is False")
    return Probe(True, f"{torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}, "
                       f"CUDA {torch.version.cuda}")


def triton_interpreter() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_triton_broken: str | None = None  # why the kernel failed to compile, once it has (see mark_triton_broken)


def mark_triton_broken(reason: str) -> None:
    """The Triton kernel failed to compile in this process: report Triton unavailable from now on, so
    ``backend="auto"`` stops trying it."""
    global _triton_broken
    _triton_broken = reason


def triton() -> Probe:
    if _triton_broken is not None:
        return Probe(False, f"the kd_loss kernel failed to compile: {_triton_broken}")
    return _triton_import()


@functools.cache
def _triton_import() -> Probe:
    probe = _import_probe("triton")
    if not probe.available:
        return probe
    kernels = _import_probe("spacedkd_fast.kernels")
    if not kernels.available:
        return Probe(False, f"triton {probe.detail} imports but spacedkd_fast.kernels does not: {kernels.detail}")
    return Probe(True, f"{probe.detail}{', interpreter (TRITON_INTERPRET=1)' if triton_interpreter() else ''}")


@functools.cache
def cpp_extension() -> Probe:
    probe = _import_probe("spacedkd_fast._C", version_attr="__doc__")
    if probe.available:
        return Probe(True, f"built, {torch.get_num_threads()} OpenMP thread(s)")
    return Probe(False, f"{probe.detail}; reinstall with torch present: "
                        f"pip install --no-build-isolation -e .")


@functools.cache
def dali() -> Probe:
    return _import_probe("nvidia.dali")


def dali_fused_ops() -> Probe:
    """spacedkd_fast's DALI CPU operators (csrc/dali/): compiled on first use, then loaded into DALI."""
    if not dali().available:
        return Probe(False, f"DALI unavailable: {dali().detail}")
    from spacedkd_fast.data import dali_ops

    try:
        return Probe(True, dali_ops.load().detail)
    except dali_ops.OpsBuildError as exc:
        return Probe(False, str(exc).splitlines()[0])


_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    """Log a fallback once per process and key."""
    if key not in _warned:
        _warned.add(key)
        logger.warning("spacedkd_fast: %s", message)


def triton_can_run_on(device: torch.device) -> bool:
    if device.type == "cuda":
        return triton().available
    return device.type == "cpu" and triton_interpreter() and triton().available


def check_loss_backend(backend) -> str:
    """``backend`` when it names a loss backend (``LOSS_BACKENDS``), else the one ValueError every loss raises."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"kd_loss: backend must be one of {LOSS_BACKENDS}, got {backend!r}")
    return backend


@torch.compiler.assume_constant_result  # torch.compile bakes the choice in instead of tracing the probes
def select_loss_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Resolve ``backend`` for a kd_loss call on tensors of ``device`` / ``dtype``.

    ``auto`` picks Triton on CUDA, the C++ extension on CPU and the torch reference otherwise (float64 always
    goes to the reference). An explicitly requested backend that cannot run raises with the reason.
    """
    check_loss_backend(requested)
    if requested == "auto":
        forced = os.environ.get("SPACEDKD_LOSS_BACKEND")
        if forced:
            return select_loss_backend(forced, device, dtype)
        if dtype == torch.float64:
            return "torch"
        if device.type == "cuda":
            if triton().available:
                return "triton"
            warn_once("triton", f"Triton unavailable ({triton().detail}); kd_loss uses the torch reference on CUDA")
            return "torch"
        if device.type == "cpu":
            if cpp_extension().available:
                return "cpp"
            warn_once("cpp", f"C++ extension unavailable ({cpp_extension().detail}); "
                             "kd_loss uses the torch reference on CPU")
        return "torch"

    if requested == "torch":
        return "torch"
    if dtype == torch.float64:
        raise ValueError(f"kd_loss: backend={requested!r} supports float32, bfloat16 and float16 logits; for "
                         f"float64 use backend='torch' (or 'auto')")
    if requested == "triton":
        if not triton().available:
            raise RuntimeError(f"kd_loss: backend='triton' requested but Triton is unavailable: {triton().detail}")
        if not triton_can_run_on(device):
            raise RuntimeError(f"kd_loss: backend='triton' needs CUDA tensors (or CPU tensors with "
                               f"TRITON_INTERPRET=1); got tensors on {device}")
        return "triton"
    # cpp
    if device.type != "cpu":
        raise RuntimeError(f"kd_loss: backend='cpp' runs on CPU tensors; got tensors on {device}")
    if not cpp_extension().available:
        raise RuntimeError(f"kd_loss: backend='cpp' requested but the C++ extension is unavailable: "
                           f"{cpp_extension().detail}")
    return "cpp"
