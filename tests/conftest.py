"""Shared test setup: markers that skip cleanly, seeding, and a clear message when the package is not installed."""

import os

import pytest
import torch

try:
    import spacedkd_fast  # noqa: F401
    from spacedkd_fast import backends
except ImportError as exc:  # pragma: no cover - only on a broken checkout
    raise pytest.UsageError(f"spacedkd_fast is not importable ({exc}); install it first: "
                            "pip install --no-build-isolation -e '.[dev]'") from exc

HAS_CUDA = torch.cuda.is_available()
TRITON_RUNS = backends.triton().available and (HAS_CUDA or backends.triton_interpreter())


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_triton = pytest.mark.skip(
        reason="needs CUDA or the Triton interpreter: run `TRITON_INTERPRET=1 pytest -m triton` (CI does)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not TRITON_RUNS:
            item.add_marker(skip_triton)


def pytest_report_header(config):
    return [f"spacedkd_fast backends: triton={backends.triton()}, cpp={backends.cpp_extension()}, "
            f"cuda={backends.cuda()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
