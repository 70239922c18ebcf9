"""Build of spacedkd_fast.

The optional C++ CPU extension ``spacedkd_fast._C`` (pybind11, through torch.utils.cpp_extension) is built from
``csrc/`` according to the environment variable ``SPACEDKD_BUILD_EXT``:

* ``auto`` (default): build it when torch is importable; if the build fails, say so and install without it.
* ``1``: build it, and fail the install if that is impossible.
* ``0``: do not build it (pure-Python install; the package falls back to the torch reference on CPU).

torch must already be installed, and pip must be told not to isolate the build
(``pip install --no-build-isolation -e .``), otherwise the build cannot see torch and ``auto`` skips the extension.
The Triton sources in ``kernels/`` install as ``spacedkd_fast.kernels``, never as a top-level ``kernels`` module.
The DALI operator sources in ``csrc/dali/`` are compiled on first use, against the DALI installed then (see
``spacedkd_fast/data/dali_ops.py``); a wheel carries them as ``spacedkd_fast/_csrc/dali/``.
"""

import os
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

MODE = os.environ.get("SPACEDKD_BUILD_EXT", "auto").strip().lower()
if MODE not in ("auto", "0", "1"):
    sys.exit(f"SPACEDKD_BUILD_EXT must be auto, 0 or 1; got {MODE!r}")

# Listed explicitly (setuptools' auto-discovery misbehaves with the kernels/ remapping in editable installs).
PACKAGES = find_packages(include=["spacedkd_fast", "spacedkd_fast.*"]) + ["spacedkd_fast.kernels"]


def _say(message: str) -> None:
    print(f"spacedkd_fast setup: {message}", file=sys.stderr)


def extension_build():
    """(ext_modules, cmdclass) for the C++ extension, or empty ones when it is not being built."""
    if MODE == "0":
        _say("SPACEDKD_BUILD_EXT=0: not building the C++ extension")
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        if MODE == "1":
            raise RuntimeError("SPACEDKD_BUILD_EXT=1 but torch is not importable in the build environment "
                               "(install torch first and use pip's --no-build-isolation)") from exc
        _say(f"torch not importable in the build environment ({exc}); installing without the C++ extension. "
             "Install torch first and pass --no-build-isolation to get it.")
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """In ``auto`` mode a failed compile is reported and skipped instead of failing the install."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if MODE == "1":
                    raise
                _say(f"building {ext.name} failed ({exc}); installing without it")

    ext = CppExtension(
        name="spacedkd_fast._C",
        sources=["csrc/bindings.cpp", "csrc/kd_loss_cpu.cpp", "csrc/kd_loss_topk_cpu.cpp", "csrc/seeds.cpp"],
        # -Wno-psabi: the 8-float vector helpers are always inlined, their ABI never crosses a call.
        extra_compile_args=["-O3", "-fopenmp", "-Wno-psabi"],
        extra_link_args=["-fopenmp"],
    )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


class BuildPyWithOperatorSources(build_py):
    """Also copy csrc/dali/*.cc into the built package (editable installs read them from the checkout)."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "spacedkd_fast" / "_csrc" / "dali"
        self.mkpath(str(target))
        for source in sorted(Path("csrc/dali").glob("*.cc")):
            self.copy_file(str(source), str(target / source.name))


ext_modules, cmdclass = extension_build()
cmdclass["build_py"] = BuildPyWithOperatorSources

setup(
    packages=PACKAGES,
    package_dir={"spacedkd_fast": "spacedkd_fast", "spacedkd_fast.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
