"""The GPU acceptance command, as far as it runs without a GPU: its arguments, its refusal on a CPU, the step
plan, the time limit that still lets pytest write its reports, and the report built from a finished run's files."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def test_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    assert exc.value.code == 2 and "OUT" in capsys.readouterr().err.upper()
    with pytest.raises(SystemExit):
        gpu_check.main(["out", "--shards", "0"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_without_a_gpu(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path / "out")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shell_entry_point_passes_arguments():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--help"], capture_output=True,
                            text=True, timeout=60, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "--quick" in result.stdout and "--report-only" in result.stdout


@pytest.mark.parametrize("quick", [False, True])
def test_plan_installs_offline_and_stays_within_budget(tmp_path, quick):
    steps = gpu_check.plan(tmp_path, quick, shards=4)
    assert [s.name for s in steps] == ["install", "tests", "kd_loss bench", "train bench"]
    install = steps[0].command
    assert install[1:] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    assert sum(s.limit_s for s in steps) + gpu_check.GRACE_S <= gpu_check.BUDGET_S["quick" if quick else "full"]
    kd = " ".join(steps[2].command)
    assert ("-k" in kd) == quick and str(tmp_path / "bench_kd_loss.json") in kd
    assert ("-k" in gpu_check.test_selection(quick)) == quick


def test_time_limit_interrupts_so_reports_are_written(tmp_path):
    """Past its limit a step gets SIGINT first: pytest (here: a stand-in) still writes what it has."""
    marker = tmp_path / "written"
    script = textwrap.dedent(f"""
        import time
        try:
            time.sleep(60)
        except KeyboardInterrupt:
            open({str(marker)!r}, "w").write("report")
    """)
    with open(tmp_path / "log", "w") as log:
        code, timed_out = gpu_check._run([sys.executable, "-c", script], 1.0, log, {})
    assert timed_out and marker.read_text() == "report"


def _junit(path: Path, cases: list[tuple[str, str | None]]) -> None:
    body = []
    for name, outcome in cases:
        inner = {"failure": '<failure message="assert 1 == 2&#10;more">trace</failure>',
                 "skipped": '<skipped message="needs 40 GB"/>', None: ""}[outcome]
        body.append(f'<testcase classname="tests.test_gpu" name="{name}">{inner}</testcase>')
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite>{"".join(body)}</testsuite></testsuites>')


def _bench(path: Path, results: list[dict]) -> None:
    path.write_text(json.dumps({"device": "NVIDIA H200", "results": results}))


def test_report_from_a_finished_run(tmp_path, capsys):
    _junit(tmp_path / "tests-0.xml", [("test_a", None), ("test_b", None), ("test_big", "skipped")])
    _junit(tmp_path / "tests-1.xml", [("test_c", "failure"), ("test_d", None)])
    group = "kd_loss fwd+bwd 8192x32000 bfloat16"
    _bench(tmp_path / "bench_kd_loss.json", [
        dict(group="copy", provider="copy", median_s=1e-3, GB_per_s=4300.0),
        dict(group=group, provider="eager", median_s=12e-3),
        dict(group=group, provider="compiled", median_s=5e-3),
        dict(group=group, provider="triton", median_s=1e-3, speedup_vs_eager=12.0, pct_of_copy_bandwidth=61.0)])
    _bench(tmp_path / "bench_train.json", [
        dict(group="train", provider="online_s0", median_s=2.0, images_per_s=12800.0),
        dict(group="train", provider="spaced_overlap", median_s=1.6, images_per_s=16000.0, speedup_vs_online_s0=1.25,
             speedup_vs_original_style=1.6, data_wait_fraction=0.01)])
    (tmp_path / "gpu_check.json").write_text(json.dumps({
        "quick": False, "total_s": 300.0, "environment": {"device": "NVIDIA H200", "torch": "2.11.0"},
        "steps": [{"name": "install", "command": [], "limit_s": 60, "seconds": 12.0, "returncode": 0,
                   "timed_out": False, "ok": True},
                  {"name": "tests", "command": [], "limit_s": 150, "seconds": 140.0, "returncode": 1,
                   "timed_out": False, "ok": False}]}))
    assert gpu_check.main([str(tmp_path), "--report-only"]) == 1
    table = capsys.readouterr().out
    assert "3 passed, 1 failed, 0 errors, 1 skipped" in table
    assert "FAIL tests.test_gpu::test_c  assert 1 == 2" in table
    assert "fwd+bwd 8192x32000 bfloat16" in table and "12.0x eager" in table and "5.0x torch.compile" in table
    assert "61% of copy" in table and "4300 GB/s" in table
    assert "train spaced_overlap" in table and "16,000 img/s" in table and "1.25x online_s0" in table
    assert "FAILED (exit 1)" in table and "verdict" in table and table.rstrip().endswith("FAIL")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and report["tests"]["failed"] == 1 and len(report["kd_loss"]) == 4

    # The same run without the failure passes.
    _junit(tmp_path / "tests-1.xml", [("test_c", None), ("test_d", None)])
    report["steps"][1].update(returncode=0, ok=True)
    (tmp_path / "gpu_check.json").write_text(json.dumps(report))
    assert gpu_check.main([str(tmp_path), "--report-only"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("PASS")


def test_tests_run_in_concurrent_shards(tmp_path, monkeypatch):
    """The test step collects once and splits the test ids over concurrent pytest processes; the report adds
    their JUnit files up (here on a CPU test file)."""
    monkeypatch.setattr(gpu_check, "test_selection", lambda quick: ["tests/test_schedule.py", "-p", "no:cacheprovider"])
    with open(tmp_path / "log", "w") as log:
        code, timed_out = gpu_check._run_test_shards(tmp_path, False, 3, 240, log)
    assert code == 0 and not timed_out
    assert sorted(p.name for p in tmp_path.glob("tests-*.xml")) == ["tests-0.xml", "tests-1.xml", "tests-2.xml"]
    collected = subprocess.run([sys.executable, "-m", "pytest", "tests/test_schedule.py", "--collect-only", "-q",
                                "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    expected = sum("::" in line for line in collected.stdout.splitlines())
    tests = gpu_check.read_tests(tmp_path)
    assert tests["passed"] == expected > 0 and tests["failed"] == tests["errors"] == 0
