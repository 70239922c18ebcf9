"""Print the gradient-accuracy contract as markdown: every CPU-available kd_loss backend against the float64
reference on the contract's cases (``tests/grad_contract.py``), per input dtype.

    python bench/grad_contract.py                          # torch and C++ backends
    TRITON_INTERPRET=1 python bench/grad_contract.py       # plus Triton, through the interpreter (slow)
    python bench/grad_contract.py --per-case               # also one row per case and temperature

Error = max|x − x64| / max|x64| per output (loss, student gradient, teacher gradient), the worst over the cases and
T ∈ {1, 4}. Not a benchmark: nothing is timed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import grad_contract as contract  # noqa: E402  (tests/grad_contract.py: the cases, the metric, the tolerances)

from spacedkd_fast import backends  # noqa: E402


def available_backends() -> list[str]:
    """The kd_loss backends that run on CPU tensors here: torch, cpp (when built), triton (interpreter only)."""
    found = []
    for name in ("torch", "cpp", "triton"):
        try:
            backends.select_loss_backend(name, torch.device("cpu"), torch.float32)
        except (RuntimeError, ValueError):
            continue
        found.append(name)
    return found


def _fmt(e: float) -> str:
    return "0" if e == 0 else f"{e:.1e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-case", action="store_true", help="one row per case, temperature and dtype too")
    parser.add_argument("--backends", nargs="+", default=None, help="default: every backend available on CPU")
    args = parser.parse_args(argv)
    # The interpreter evaluates masked-off lanes in numpy (e.g. -inf - -inf); the kernel discards them.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    names = args.backends or available_backends()
    rows = []  # (backend, dtype, case, T, errors)
    for backend in names:
        for dtype in contract.DTYPES:
            for case in contract.CASES:
                for temperature in contract.TEMPERATURES:
                    rows.append((backend, dtype, case.name, temperature,
                                 contract.measure(case, backend, dtype, temperature)))

    print("| backend | dtype | loss | student grad | teacher grad | worst case (student / teacher grad) | all finite | "
          "within contract |")
    print("|---|---|---|---|---|---|---|---|")
    ok_all = True
    for backend in names:
        for dtype in contract.DTYPES:
            mine = [r for r in rows if r[0] == backend and r[1] == dtype]
            worst = {k: max(r[4][k] for r in mine) for k in ("loss", "grad_student", "grad_teacher")}
            worst_s = max(mine, key=lambda r: r[4]["grad_student"])
            worst_t = max(mine, key=lambda r: r[4]["grad_teacher"])
            finite = all(r[4]["finite"] for r in mine)
            ok = all(contract.within(r[4], dtype) for r in mine)
            ok_all &= ok
            label = "triton (interpreter)" if backend == "triton" else backend
            print(f"| {label} | {str(dtype).removeprefix('torch.')} | {_fmt(worst['loss'])} | "
                  f"{_fmt(worst['grad_student'])} | {_fmt(worst['grad_teacher'])} | {worst_s[2]} T = {worst_s[3]:g} "
                  f"/ {worst_t[2]} T = {worst_t[3]:g} | {'yes' if finite else 'NO'} | {'yes' if ok else 'NO'} |")
    if args.per_case:
        print("\n| backend | dtype | case | T | loss | student grad | teacher grad |")
        print("|---|---|---|---|---|---|---|")
        for backend, dtype, name, temperature, e in rows:
            print(f"| {backend} | {str(dtype).removeprefix('torch.')} | {name} | {temperature:g} | "
                  f"{_fmt(e['loss'])} | {_fmt(e['grad_student'])} | {_fmt(e['grad_teacher'])} |")
    tolerances = ", ".join(f"{str(d).removeprefix('torch.')}: loss {contract.LOSS_TOL[d]:g}, gradients "
                           f"{contract.GRAD_TOL[d]:g}" + (f" + {contract.GRAD_FLOOR[d]:.1e} absolute"
                                                         if contract.GRAD_FLOOR[d] else "")
                           for d in contract.DTYPES)
    print(f"\ncontract tolerances: {tolerances}; {'all within' if ok_all else 'SOME OUTSIDE'}")
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
