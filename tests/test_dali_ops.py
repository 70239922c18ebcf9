"""Building and loading the fused DALI CPU operator (csrc/dali/), and the augmenter's fallback when it cannot be.

The operator's output is checked against the numpy spec in test_dali.py (graph="fused").
"""

import logging
import os
import stat
import subprocess
import sys
import threading

import pytest
import torch
from test_files import HAS_DALI

from spacedkd_fast import backends
from spacedkd_fast.data import dali_ops

needs_dali = pytest.mark.skipif(not HAS_DALI, reason="nvidia.dali is not installed")


@needs_dali
def test_concurrent_builds_compile_once_and_reuse_the_cache(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(dali_ops.build(cache=tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    (path_a, seconds_a), (path_b, seconds_b) = results
    assert path_a == path_b and path_a.is_file() and path_a.parent == tmp_path
    assert sorted([seconds_a is None, seconds_b is None]) == [False, True]  # one compiled, one waited and reused
    assert dali_ops.build(cache=tmp_path) == (path_a, None)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    assert not leftovers


@needs_dali
def test_missing_compiler_is_named(tmp_path):
    with pytest.raises(dali_ops.OpsBuildError, match="C\\+\\+ compiler 'no-such-compiler-xyz' not found"):
        dali_ops.build(cache=tmp_path, cxx="no-such-compiler-xyz")
    assert not list(tmp_path.iterdir())


@needs_dali
def test_failed_compile_reports_its_output_and_leaves_no_library(tmp_path):
    compiler = tmp_path / "broken-cxx"
    compiler.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo broken 1.0; exit 0; fi\n"
                        "echo 'error: the compiler is broken' >&2\nexit 3\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IXUSR)
    cache = tmp_path / "cache"
    with pytest.raises(dali_ops.OpsBuildError, match=r"(?s)failed \(exit 3\).*the compiler is broken"):
        dali_ops.build(cache=cache, cxx=str(compiler))
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


@needs_dali
def test_missing_cuda_headers_name_the_package(tmp_path, monkeypatch):
    import nvidia

    include = tmp_path / "cu13" / "include"
    include.mkdir(parents=True)
    (include / "cuda_runtime.h").write_text("")
    monkeypatch.setattr(nvidia, "__path__", [str(tmp_path)])
    with pytest.raises(dali_ops.OpsBuildError, match="nvidia-cuda-crt"):
        dali_ops.build(cache=tmp_path / "cache")
    (include / "crt").mkdir()
    (include / "crt" / "host_config.h").write_text("")
    with pytest.raises(dali_ops.OpsBuildError, match="nvidia-cuda-cccl"):
        dali_ops.build(cache=tmp_path / "cache")
    (include / "cuda_runtime.h").unlink()
    with pytest.raises(dali_ops.OpsBuildError, match="cuda_runtime.h not found"):
        dali_ops.build(cache=tmp_path / "cache")


@needs_dali
def test_turned_off_by_environment():
    code = "from spacedkd_fast import backends; print(backends.dali_fused_ops())"
    env = {**os.environ, "SPACEDKD_DALI_FUSED": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "no (turned off by SPACEDKD_DALI_FUSED=0)"


@needs_dali
def test_augmenter_falls_back_to_the_stock_graph_with_one_log_line(monkeypatch, caplog):
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    monkeypatch.setattr(backends, "dali_fused_ops", lambda: backends.Probe(False, "no compiler here (test)"))
    monkeypatch.setattr(backends, "_warned", set())
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="spacedkd_fast"):
        first = DaliArrayAugmenter((3, 8, 8), 4, cpu)
        second = DaliArrayAugmenter((3, 8, 8), 4, cpu)
    assert first.graph == second.graph == "stock"
    lines = [r.getMessage() for r in caplog.records if "fused DALI CPU operator unavailable" in r.getMessage()]
    assert len(lines) == 1 and "no compiler here (test)" in lines[0]
    with pytest.raises(RuntimeError, match="graph='fused' asked for.*no compiler here \\(test\\)"):
        DaliArrayAugmenter((3, 8, 8), 4, cpu, graph="fused")
    assert DaliArrayAugmenter((3, 8, 8), 4, cpu, graph="stock").graph == "stock"


@needs_dali
def test_augmenter_uses_the_fused_operator_by_default_on_cpu():
    from spacedkd_fast.data.dali import DaliArrayAugmenter

    probe = backends.dali_fused_ops()
    assert probe.available, f"the fused operator must build in a [dev] install: {probe.detail}"
    assert DaliArrayAugmenter((3, 8, 8), 4, torch.device("cpu")).graph == "fused"
    with pytest.raises(ValueError, match="graph must be one of"):
        DaliArrayAugmenter((3, 8, 8), 4, torch.device("cpu"), graph="fast")


@needs_dali
def test_unwritable_cache_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(dali_ops.OpsBuildError, match="cannot write the operator cache.*SPACEDKD_CACHE_DIR"):
        dali_ops.build(cache=blocker / "cache")
