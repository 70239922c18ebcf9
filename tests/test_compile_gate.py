"""The compile gate: every Triton kernel configuration the package launches compiles for sm_90a and sm_80 with
Triton's real compiler and ptxas, with no spilled byte; and the gate itself notices spills and compile errors.

No GPU is involved and nothing runs: the kernels are compiled through the package's own launcher against a
compile-only driver (see ``kernels/compile_gate.py``).
"""

import json
import os
import subprocess
import sys

import pytest

from spacedkd_fast.kernels import compile_gate as gate
from spacedkd_fast.kernels import launch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1",
                                reason="the compile gate compiles real kernels; it runs in the plain test pass")


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.mark.slow
def test_every_configuration_compiles_without_spills(tmp_path):
    out = tmp_path / "gate.json"
    result = subprocess.run([sys.executable, "-m", "spacedkd_fast.kernels.compile_gate", "--arch", "90", "80",
                             "--jobs", str(min(os.cpu_count() or 1, 4)), "--json", str(out)],
                            capture_output=True, text=True, timeout=1800, env=_env())
    report = json.loads(out.read_text())
    assert result.returncode == 0 and report["ok"], result.stdout[-4000:] + result.stderr[-2000:]
    assert report["cases"] == 2 * len(gate.gate_cases())
    assert not report["failures"]
    kernels = report["kernels"]
    assert {k["arch"] for k in kernels} == {"sm_90a", "sm_80"}
    for k in kernels:
        assert 0 < k["registers"] <= 255 and k["spill_bytes"] == 0, k
    # The grid reaches every path of the kernel: one-block, streamed, single-program, teacher gradient, 64-bit
    # column offsets, several students.
    configs = [k["config"] for k in kernels]
    assert any(c["ONE_BLOCK"] and not c["SINGLE_PROGRAM"] for c in configs)
    assert any(not c["ONE_BLOCK"] for c in configs)
    assert any(c["SINGLE_PROGRAM"] for c in configs)
    assert any(c["GRAD_T"] for c in configs)
    assert any(c["COL64"] for c in configs)
    assert any(c["KP"] >= 4 for c in configs)
    assert "0 bytes spilled" in result.stdout and "| sm_90a | streaming |" in result.stdout
    # The top-k teacher kernel too: one-block and streamed, both tail policies.
    topk = [k for k in kernels if "topk" in k["kernel"]]
    assert any(k["config"]["ONE_BLOCK"] for k in topk) and any(not k["config"]["ONE_BLOCK"] for k in topk)
    assert any(k["config"]["BUCKET"] for k in topk) and any(k["config"]["KB"] == 256 for k in topk)


def test_topk_kernel_is_gated():
    """kd_loss_topk's kernel is in the grid and goes through the gate's compile-only launcher like the dense one."""
    cases = gate.gate_cases()
    topk = [c for c in cases if getattr(c, "topk", 0)]  # (the fused-linear cases have no top-k)
    assert any(c.topk == 256 for c in topk) and any(c.tail == "bucket" for c in topk)
    report = gate.run_gate([gate.Case(128, 1001, dtype="bfloat16", topk=64, tail="bucket")], archs=(90,), jobs=1)
    assert report.ok, gate.format_table(report)
    (kernel,) = report.kernels
    assert "topk" in kernel.kernel and kernel.config["BUCKET"] and kernel.spill_bytes == 0
    assert "top-k one-block" in gate.format_table(report)


def test_gate_catches_spills(monkeypatch):
    """Blocks of 32K elements on 8 warps (128 per thread) cannot fit in registers: the gate must say so."""
    monkeypatch.setattr(launch, "MAX_BLOCK_V", 32768)
    monkeypatch.setattr(launch, "ELEMENTS_PER_THREAD", 128)
    report = gate.run_gate([gate.Case(64, 32000, teacher_grad=True)], archs=(90,), jobs=1)
    assert not report.ok and not report.failures
    (kernel,) = report.kernels
    assert kernel.spill_bytes > 0 and kernel.config["BV"] == 32768
    assert "SPILLS" in gate.format_table(report)


def test_gate_reports_compile_errors(monkeypatch):
    """A configuration the compiler rejects (tl.arange needs a power of 2) is reported with its case."""
    real = launch.kd_loss_config

    def broken(*args, **kwargs):
        return {**real(*args, **kwargs), "BV": 100}

    monkeypatch.setattr(launch, "kd_loss_config", broken)
    report = gate.run_gate([gate.Case(8, 100)], archs=(90,), jobs=1)
    assert not report.ok
    (arch, case, error) = report.failures[0]
    assert arch == "sm_90a" and case == "8x100 float32" and "CompilationError" in error
    assert "COMPILE ERROR sm_90a 8x100 float32" in gate.format_table(report)


def test_resource_usage_reads_the_cubin():
    report = gate.run_gate([gate.Case(128, 1000, dtype="bfloat16")], archs=(90,), jobs=1)
    (kernel,) = report.kernels
    assert report.ok and 0 < kernel.registers <= 255 and kernel.stack_bytes == 0 and kernel.local_bytes == 0
    assert kernel.num_warps == launch.kd_loss_config(128, 1, 1000, reduced=True)["num_warps"]


def test_gate_refuses_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        gate.run_gate([gate.Case(8, 10)], jobs=1)


def test_launch_config_uses_the_gpu():
    """No single-program launch where the problem could fill a GPU; programs enough for 100+ SMs."""
    big = launch.kd_loss_config(256, 1, 1000, reduced=True)  # ImageNet-1k at batch 256: 256K elements
    assert not big["SINGLE_PROGRAM"] and big["grid"][0] >= 128
    small = launch.kd_loss_config(128, 1, 100, reduced=True)  # the paper's CIFAR-100 batch: 12.8K elements
    assert small["SINGLE_PROGRAM"] and small["grid"] == (1,)
    assert launch.kd_loss_config(128, 1, 100, reduced=False)["grid"][0] > 1  # "none" never reduces in-launch
    assert launch.kd_loss_config(8192, 1, 32000, reduced=True)["grid"] == (8192,)


def test_column_offsets_widen_past_int32():
    assert not launch.kd_loss_config(8192, 1, 128256, reduced=True, column_stride=1)["COL64"]
    assert not launch.kd_loss_config(8192, 1, 128256, reduced=True, column_stride=8192)["COL64"]  # 1.05e9
    assert launch.kd_loss_config(32768, 1, 128256, reduced=True, column_stride=32768)["COL64"]  # 4.2e9 > 2^31
