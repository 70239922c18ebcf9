"""Optional parts are optional: the package imports and falls back, with one log line, when they are missing."""

import subprocess
import sys
import textwrap

import pytest

from spacedkd_fast import backends, info

BLOCKER = """
import importlib.abc, sys
import torch  # torch itself may import Triton; hide it from everything imported after this point
for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
    del sys.modules[name]
class Broken(importlib.abc.MetaPathFinder):
    # Simulates a missing Triton and an extension that fails to load (e.g. an undefined symbol).
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("No module named 'triton'")
        if name == "spacedkd_fast._C":
            raise ImportError("spacedkd_fast/_C.so: undefined symbol: _ZN3c104cuda")
        return None
sys.meta_path.insert(0, Broken())
"""


def _run_blocked(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where Triton is missing and the C++ extension is broken."""
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300)




def test_import_and_fallback_without_triton_or_extension():
    result = _run_blocked("""
    import logging, torch
    logging.basicConfig(level=logging.INFO, format="LOG %(message)s")
    import spacedkd_fast
    from spacedkd_fast import backends
    assert not backends.triton().available and not backends.cpp_extension().available
    s, t, y = torch.randn(4, 10, requires_grad=True), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    for _ in range(3):
        spacedkd_fast.kd_loss(s, t, y).backward()
    print("backend:", backends.select_loss_backend("auto", s.device, s.dtype))
    """)
    assert result.returncode == 0, result.stderr
    assert "backend: torch" in result.stdout
    log_lines = [line for line in result.stderr.splitlines() if line.startswith("LOG")]
    assert len(log_lines) == 1, log_lines
    assert "C++ extension unavailable" in log_lines[0] and "undefined symbol" in log_lines[0]


def test_explicit_backend_reports_the_load_error():
    result = _run_blocked("""
    import torch, spacedkd_fast
    try:
        spacedkd_fast.kd_loss(torch.randn(2, 3), torch.randn(2, 3), backend="cpp")
    except RuntimeError as exc:
        print("ERR", exc)
    """)
    assert result.returncode == 0, result.stderr
    assert "ERR kd_loss: backend='cpp' requested but the C++ extension is unavailable" in result.stdout
    assert "undefined symbol" in result.stdout


def test_info_module_prints_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "spacedkd_fast.info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    import torch

    assert torch.__version__ in result.stdout
    assert "kd_loss backend, cpu float32" in result.stdout
    assert "C++ extension" in result.stdout and "Triton" in result.stdout and "DALI" in result.stdout


def test_info_collect_picks_cpp_on_cpu_when_built():
    data = info.collect()
    expected = "cpp" if backends.cpp_extension().available else "torch"
    assert data["kd_loss backend, cpu float32"] == expected


def test_env_override(monkeypatch):
    import torch

    monkeypatch.setenv("SPACEDKD_LOSS_BACKEND", "torch")
    assert backends.select_loss_backend("auto", torch.device("cpu"), torch.float32) == "torch"
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        if backends.triton_interpreter():
            pytest.skip("the interpreter runs Triton on CPU")
        backends.select_loss_backend("triton", torch.device("cpu"), torch.float32)


def _compile_failure(monkeypatch):
    """Make Triton the "auto" choice for these CPU tensors, and make its kernel fail to compile at launch."""
    from triton.compiler.errors import CompilationError

    from spacedkd_fast.kernels import kd_loss_launch

    monkeypatch.setattr(backends, "_triton_broken", None)
    monkeypatch.setattr(backends, "_warned", set())
    real_select = backends.select_loss_backend

    def select(requested, device, dtype):
        if requested == "triton" or (requested == "auto" and backends.triton().available):
            return "triton"
        return real_select("torch" if requested == "auto" else requested, device, dtype)

    monkeypatch.setattr(backends, "select_loss_backend", select)
    calls = []

    def failing_launch(kernel, grid, args, kwargs):
        calls.append(kwargs)
        raise CompilationError("kd_loss.py", None, "simulated: unsupported on this GPU")

    monkeypatch.setattr(kd_loss_launch, "_launcher", failing_launch)
    return calls


def test_triton_compile_failure_falls_back_once(monkeypatch, caplog):
    import logging

    import torch

    from spacedkd_fast import kd_loss, kd_loss_reference

    calls = _compile_failure(monkeypatch)
    s = (torch.randn(6, 3, 17) * 3).requires_grad_(True)  # 3 students
    t = (torch.randn(3, 17) * 3).requires_grad_(True)
    y = torch.tensor([1, -100, 16])
    with caplog.at_level(logging.WARNING, logger="spacedkd_fast"):
        losses = [kd_loss(s[:3], t, y, temperature=2.0, alpha=0.3, teacher_grad=True) for _ in range(3)]
    assert len(calls) == 1, "Triton is not tried again after it failed to compile"
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "failed to compile" in lines[0] and "simulated" in lines[0], lines
    assert not backends.triton().available and "failed to compile" in backends.triton().detail
    s_ref = s.detach()[:3].double().requires_grad_(True)
    t_ref = t.detach().double().requires_grad_(True)
    ref = kd_loss_reference(s_ref, t_ref, y, temperature=2.0, alpha=0.3, teacher_grad=True)
    (ref * torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)).sum().backward()
    (losses[0] * torch.tensor([0.5, 1.0, 2.0])).sum().backward()  # the fallback's own saved gradients
    torch.testing.assert_close(losses[0].double(), ref.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(s.grad[:3].double(), s_ref.grad, rtol=2e-5, atol=2e-6)
    torch.testing.assert_close(t.grad.double(), t_ref.grad, rtol=2e-5, atol=2e-6)


def test_explicit_triton_compile_failure_raises(monkeypatch):
    import torch

    from spacedkd_fast import kd_loss

    _compile_failure(monkeypatch)
    with pytest.raises(RuntimeError, match="backend='triton' requested but the Triton kernel failed to compile"):
        kd_loss(torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3]), backend="triton")
