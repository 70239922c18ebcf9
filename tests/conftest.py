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
    # Without CUDA, Triton tests run in their own pass through the interpreter (`TRITON_INTERPRET=1 pytest -m
    # triton`, as CI does): deselect them here rather than report them as skipped.
    deselected = [item for item in items if "triton" in item.keywords and not TRITON_RUNS]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
        config._spacedkd_triton_deselected = len(deselected)
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_spacedkd_triton_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} Triton tests deselected (no CUDA): they run with "
                                    f"`TRITON_INTERPRET=1 pytest -m triton`")


def pytest_report_header(config):
    return [f"spacedkd_fast backends: triton={backends.triton()}, cpp={backends.cpp_extension()}, "
            f"cuda={backends.cuda()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
