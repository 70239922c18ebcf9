"""spacedkd_fast's own DALI CPU operators (``csrc/dali/``): compiled against the installed DALI on first use.

Why: on the CPU, DALI's cost for CIFAR-sized images is per sample and per operator, and the stock graph of
:class:`~spacedkd_fast.data.dali.DaliArrayAugmenter` needs three operators (slice, warp_affine, transpose).
``SpacedkdCropFlipRotate`` (``fn.spacedkd_crop_flip_rotate``) does crop → flip → rotate → CHW in one pass, byte
for byte as :func:`~spacedkd_fast.data.augment.augment_reference_numpy` (rounding ties included).

Why built on first use rather than at install: DALI is an optional dependency that pip installs *after* building
this package, and a DALI plugin must be compiled against the DALI it is loaded into. The shared library is cached
under ``$SPACEDKD_CACHE_DIR`` (default ``$XDG_CACHE_HOME/spacedkd_fast`` or ``~/.cache/spacedkd_fast``), keyed
by the source, the DALI version, the compiler and the flags, so later processes only load it (about 6 s to build
on 2 cores, once).

Needs: a C++20 compiler (``$CXX``, default ``g++``) and the CUDA headers DALI's headers include
(``nvidia-cuda-runtime``, which torch's CUDA builds bring, plus ``nvidia-cuda-crt`` and ``nvidia-cuda-cccl``: the
``[dali]`` extra installs them). Without them :func:`load` reports why and the augmenter runs the stock graph.
``SPACEDKD_DALI_FUSED=0`` turns the operator off.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FUSED_AUGMENT_OP", "OpsBuildError", "build", "cache_dir", "load", "source_path"]

FUSED_AUGMENT_OP = "spacedkd_crop_flip_rotate"  # the fn.* name of SpacedkdCropFlipRotate
SOURCE_NAME = "crop_flip_rotate.cc"
HEADERS_HINT = 'pip install "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" (or the [dali] extra)'


class OpsBuildError(RuntimeError):
    """The operators cannot be built or loaded here; the message says why and what would fix it."""


def source_path() -> Path:
    """The operator source: packaged next to this module (wheel installs) or in the checkout's ``csrc/dali/``."""
    here = Path(__file__).resolve()
    for candidate in (here.parent.parent / "_csrc" / "dali" / SOURCE_NAME,
                      here.parents[2] / "csrc" / "dali" / SOURCE_NAME):
        if candidate.is_file():
            return candidate
    raise OpsBuildError(f"the operator source {SOURCE_NAME} is missing (looked in spacedkd_fast/_csrc/dali and the "
                        f"checkout's csrc/dali); reinstall spacedkd_fast")


def cache_dir() -> Path:
    """Where built operator libraries are kept (``$SPACEDKD_CACHE_DIR``, else the XDG cache)."""
    if os.environ.get("SPACEDKD_CACHE_DIR"):
        return Path(os.environ["SPACEDKD_CACHE_DIR"]) / "dali_ops"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "spacedkd_fast" / "dali_ops"


def _cuda_include_dir() -> Path:
    """The pip CUDA headers' include directory (``nvidia/cu13/include`` or alike), checked for what DALI needs."""
    try:
        import nvidia
    except ImportError as exc:
        raise OpsBuildError(f"no pip CUDA headers (the nvidia namespace package is missing: {exc})") from exc
    found = [p for root in nvidia.__path__ for p in sorted(Path(root).glob("*/include"))
             if (p / "cuda_runtime.h").is_file()]
    if not found:
        raise OpsBuildError("cuda_runtime.h not found under the nvidia packages (torch's CUDA builds bring it with "
                            "nvidia-cuda-runtime)")
    include = found[0]
    for header, package in (("crt/host_config.h", "nvidia-cuda-crt"), ("nv/target", "nvidia-cuda-cccl")):
        if not (include / header).is_file():
            raise OpsBuildError(f"{include / header} is missing (package {package}); {HEADERS_HINT}")
    return include


def _cpu_flags() -> list[str]:
    # roundps (SSE4.1) lets the compiler vectorise floor(); every x86-64 CPU of the last 15 years has it, but the
    # library is cached by flags, so ask the CPU rather than assume.
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return ["-msse4.1"] if " sse4_1" in cpuinfo else []


# -ffp-contract=off: no fused multiply-add, each float32 operation rounds as the spec says. -fno-trapping-math only
# lets the float -> int conversions vectorise (no value changes). -w: DALI's headers warn under g++ 12.
FLAGS = ["-std=c++20", "-O3", "-shared", "-fPIC", "-w", "-ffp-contract=off", "-fno-trapping-math"]


def _compiler(cxx: str | None) -> str:
    name = cxx or os.environ.get("CXX") or "g++"
    path = shutil.which(name)
    if path is None:
        raise OpsBuildError(f"C++ compiler {name!r} not found (set CXX to a C++20 compiler)")
    return path


def build(cache: Path | None = None, cxx: str | None = None) -> tuple[Path, float | None]:
    """Compile the operators for the installed DALI, or find them already built.

    Args:
        cache: directory for the library (default :func:`cache_dir`).
        cxx: compiler (default ``$CXX`` or ``g++``).

    Returns:
        ``(library path, seconds spent compiling)``; seconds is None when a cached library was reused.

    Raises:
        OpsBuildError: DALI, the headers or the compiler are missing, or the compile failed (with its output).
    """
    try:
        import nvidia.dali as dali
        import nvidia.dali.sysconfig as sysconfig
    except ImportError as exc:
        raise OpsBuildError(f"DALI is not importable ({exc})") from exc
    compiler = _compiler(cxx)
    source = source_path()
    include = _cuda_include_dir()
    command_tail = [*FLAGS, *_cpu_flags(), *sysconfig.get_compile_flags(), f"-I{include}"]
    link = sysconfig.get_link_flags()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256("\0".join([source.read_text(), dali.__version__, compiler, *version, *command_tail,
                                    *link]).encode()).hexdigest()[:16]
    cache = Path(cache) if cache is not None else cache_dir()
    library = cache / f"libspacedkd_dali_ops-{key}.so"
    if library.is_file():
        return library, None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        lock = open(cache / f"{library.name}.lock", "w")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise OpsBuildError(f"cannot write the operator cache {cache} ({exc}); set SPACEDKD_CACHE_DIR to a "
                            f"writable directory") from exc
    import fcntl  # POSIX only, like DALI; imported here so this module imports anywhere

    # One process compiles, the others wait for it (several ranks or test workers start at once).
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return library, None
        fd, partial = tempfile.mkstemp(dir=cache, prefix=f".{library.name}.", suffix=".partial")
        os.close(fd)
        start = time.perf_counter()
        try:
            result = subprocess.run([compiler, *command_tail, str(source), "-o", partial, *link],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise OpsBuildError(f"compiling {source} failed (exit {result.returncode}):\n"
                                    f"{result.stderr.strip()[-4000:]}")
            os.replace(partial, library)  # atomic: a library in the cache is always complete
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
        return library, time.perf_counter() - start


@dataclass(frozen=True)
class LoadedOps:
    """The operators are loaded into DALI: ``path`` is the library, ``detail`` says how it got there."""

    path: Path
    detail: str


_load_lock = threading.Lock()


@functools.cache
def _load() -> LoadedOps | OpsBuildError:
    if os.environ.get("SPACEDKD_DALI_FUSED", "1").strip() == "0":
        return OpsBuildError("turned off by SPACEDKD_DALI_FUSED=0")
    try:
        library, seconds = build()
        import nvidia.dali.plugin_manager as plugin_manager

        plugin_manager.load_library(str(library))
    except OpsBuildError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - a failed dlopen / registration can raise anything
        return OpsBuildError(f"loading the operators into DALI failed: {type(exc).__name__}: {exc}")
    how = f"built in {seconds:.1f} s" if seconds is not None else "cached"
    return LoadedOps(library, f"{how}, {library}")


def load() -> LoadedOps:
    """Build (once per machine) and load (once per process) the operators into DALI.

    Raises:
        OpsBuildError: why they are unavailable; the same error on every call of this process.
    """
    with _load_lock:
        result = _load()
    if isinstance(result, OpsBuildError):
        raise OpsBuildError(str(result))
    return result
