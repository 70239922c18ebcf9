"""The gradient-accuracy contract (``tests/grad_contract.py``): every backend that runs here, on bfloat16, float16
and float32 inputs, against the float64 reference on the same values, for confident rows, teacher ≈ student,
T = 1 and 4, masked tokens, all-ignored rows, padded sequences and rows split across two calls.

The errors are measured as ``max|x − x64| / max|x64|`` per output; ``bench/grad_contract.py`` prints them as the
table of the README. Triton cases run with ``TRITON_INTERPRET=1 pytest -m triton``.
"""

import pytest
import torch
from grad_contract import CASES, DTYPES, GRAD_FLOOR, GRAD_TOL, LOSS_TOL, TEMPERATURES, N, V, measure, within
from helpers import LOSS_BACKENDS

from spacedkd_fast import kd_loss


@pytest.mark.parametrize("temperature", TEMPERATURES, ids=lambda t: f"T{t:g}")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name.replace(" ", "_").replace("≈", "~"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_contract(backend, dtype, case, temperature):
    measured = measure(case, backend, dtype, temperature)
    assert measured["finite"], f"{case.name}: not finite where the reference is: {measured}"
    assert within(measured, dtype), (
        f"{case.name} {dtype} T={temperature}: loss {measured['loss']:.2e} (≤ {LOSS_TOL[dtype]:g}), student grad "
        f"{measured['grad_student']:.2e}, teacher grad {measured['grad_teacher']:.2e} (≤ {GRAD_TOL[dtype]:g} + "
        f"{GRAD_FLOOR[dtype]:g} absolute)")
    if case.name == "all ignored":
        assert measured["abs"]["loss"] == (0.0, 0.0)
        assert measured["abs"]["grad_student"] == (0.0, 0.0) and measured["abs"]["grad_teacher"] == (0.0, 0.0)


def test_targets_of_the_issue():
    """The contract's tolerances are at least as strict as the issue's targets (bfloat16 gradients 1e-2, loss
    1e-3)."""
    assert GRAD_TOL[torch.bfloat16] <= 1e-2 and GRAD_FLOOR[torch.bfloat16] == 0.0
    assert all(LOSS_TOL[d] <= 1e-3 for d in DTYPES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", LOSS_BACKENDS)
def test_split_rows_add_up(backend, dtype):
    """reduction="sum" over rows split anywhere (here inside a sequence) adds up to one call on all rows, and the
    mean of a part is its sum over its own non-ignored rows."""
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(N, V, generator=g) * 3).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::3] = -100
    options = dict(temperature=2.0, alpha=0.5, label_smoothing=0.1, backend=backend)
    whole = kd_loss(s, t, y, reduction="sum", **options)
    cut = 23
    parts = kd_loss(s[:cut], t[:cut], y[:cut], reduction="sum", **options) + kd_loss(
        s[cut:], t[cut:], y[cut:], reduction="sum", **options)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=0)
    mean_first = kd_loss(s[:cut], t[:cut], y[:cut], reduction="mean", **options)
    sum_first = kd_loss(s[:cut], t[:cut], y[:cut], reduction="sum", **options)
    torch.testing.assert_close(mean_first * (y[:cut] != -100).sum(), sum_first, rtol=1e-6, atol=0)
