"""One-shot GPU acceptance run: ``bench/gpu_check.sh OUT_DIR [--quick]`` on a machine with one NVIDIA GPU.

Made for a lent machine with PyTorch and Triton preinstalled and no network (Python 3.12, torch 2.11, Triton 3.6,
no DALI): it installs this checkout without touching the network, then

1. runs the GPU-marked and Triton tests on the GPU (in parallel shards: the time goes into compiling kernels),
2. benchmarks kd_loss (Triton vs eager vs torch.compile, and Liger when importable) at the classification and LLM
   shapes, with the device's measured copy bandwidth,
3. benchmarks training (ResNet-18, CIFAR-shaped synthetic data, batch 128: base, online s = 0, spaced sequential,
   spaced overlapped, original-style),

and writes ``OUT_DIR/gpu_check.json`` (everything, with device, versions and commit) and ``OUT_DIR/gpu_check.log``
(every command's output), prints a verdict table and exits non-zero when anything failed. Each step has a time
limit (interrupted with SIGINT, so a benchmark still writes what it measured), which keeps the whole run within
6 minutes on an H100/H200 (``--quick``: 3).

``--report-only`` rebuilds the JSON and the table from the files a run left in OUT_DIR (no GPU needed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {"full": 360, "quick": 180}
GRACE_S = 10  # after SIGINT, before SIGKILL


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    env: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def test_selection(quick: bool) -> list[str]:
    """pytest arguments of the test step: every GPU and Triton test (``--quick``: without the hyperparameter
    sweep and the forced small blocks, which compile the most kernel variants)."""
    args = ["tests", "-m", "gpu or triton", "-p", "no:cacheprovider"]
    if quick:
        args += ["-k", "not hyperparameters and not small_blocks and not llm_shapes"]
    return args


def plan(out: Path, quick: bool, shards: int) -> list[Step]:
    py = sys.executable
    mode = "quick" if quick else "full"
    # Seconds per step (each within the budget once the SIGINT grace is added to one step that overran).
    limits = {"full": dict(install=40, tests=150, kd_loss=100, train=55),
              "quick": dict(install=40, tests=55, kd_loss=40, train=30)}[mode]
    kd_args = [py, "-m", "pytest", "bench/bench_kd_loss.py", "-p", "no:cacheprovider", "-q",
               "--bench-out", str(out / "bench_kd_loss.json"), "--bench-max-time", "0.2" if quick else "0.3"]
    if quick:
        kd_args += ["-k", "(triton or eager or copy) and (1024x1000 or 8192x32000 or copy)"]
    train_args = [py, "-m", "pytest", "bench/bench_train.py", "-p", "no:cacheprovider", "-q",
                  "--bench-out", str(out / "bench_train.json")]
    if quick:
        train_args += ["-k", "online_s0 or spaced_sequential or spaced_overlap"]
    return [
        Step("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", "."],
             limits["install"], env={"SPACEDKD_BUILD_EXT": "0"}),  # the C++ kernel is for CPUs: not built here
        Step("tests", ["<sharded>", str(shards)], limits["tests"]),
        Step("kd_loss bench", kd_args, limits["kd_loss"]),
        Step("train bench", train_args, limits["train"]),
    ]


# ---- running -------------------------------------------------------------------------------------------------
def _run(command: list[str], limit_s: float, log, env: dict) -> tuple[int, bool]:
    """Run ``command`` from the repository root, its output into ``log``; past ``limit_s`` it gets SIGINT (pytest
    then still writes its reports), then SIGKILL."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    try:
        return proc.wait(timeout=limit_s), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, True


def _run_test_shards(out: Path, quick: bool, shards: int, limit_s: float, log) -> tuple[int, bool]:
    """Collect the tests once, then run them as ``shards`` concurrent pytest processes on the GPU."""
    collected = subprocess.run([sys.executable, "-m", "pytest", *test_selection(quick), "--collect-only", "-q"],
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
    ids = [line for line in collected.stdout.splitlines() if "::" in line]
    log.write(f"collected {len(ids)} tests into {shards} shards\n")
    log.flush()
    if not ids:
        log.write(collected.stdout + collected.stderr)
        return 1, False
    started = time.monotonic()
    procs = []
    for i in range(shards):
        chunk = ids[i::shards]
        if not chunk:
            continue
        shard_log = open(out / f"tests-{i}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "pytest", *chunk, "-p", "no:cacheprovider", "-q", "-rfE",
               "--junitxml", str(out / f"tests-{i}.xml")]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=shard_log, stderr=subprocess.STDOUT,
                                       start_new_session=True), shard_log))
    codes, timed_out = [], False
    for proc, shard_log in procs:
        remaining = max(limit_s - (time.monotonic() - started), 1)
        try:
            codes.append(proc.wait(timeout=remaining))
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGINT)
            try:
                codes.append(proc.wait(timeout=GRACE_S))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                codes.append(proc.wait())
        shard_log.close()
        log.write(Path(shard_log.name).read_text())
    return max(codes, default=1), timed_out


def environment() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count,
                    memory_gb=round(props.total_memory / 1e9, 1), capability=f"{props.major}.{props.minor}")
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                        text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        info["commit"] = "unknown"
    return info


# ---- the report ------------------------------------------------------------------------------------------------
def read_tests(out: Path) -> dict:
    """Counts and failures from the shards' JUnit XML files."""
    counts = dict(passed=0, failed=0, errors=0, skipped=0)
    failures = []
    files = sorted(out.glob("tests-*.xml"))
    for path in files:
        try:
            root = ET.parse(path).getroot()
        except ET.ParseError as exc:
            failures.append({"test": path.name, "message": f"unreadable JUnit XML: {exc}"})
            counts["errors"] += 1
            continue
        for case in root.iter("testcase"):
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
            if outcome is None:
                counts["passed"] += 1
            elif outcome.tag == "skipped":
                counts["skipped"] += 1
            else:
                counts["failed" if outcome.tag == "failure" else "errors"] += 1
                failures.append({"test": name, "message": (outcome.get("message") or "").splitlines()[0][:300]})
    return {**counts, "files": [p.name for p in files], "failures": failures}


def read_bench(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text()).get("results", [])
    except (OSError, ValueError):
        return []


def _kd_rows(results: list[dict]) -> list[tuple[str, str]]:
    rows = []
    copy = next((r for r in results if r.get("provider") == "copy"), None)
    if copy:
        rows.append(("copy bandwidth", f"{copy['GB_per_s']:.0f} GB/s"))
    for r in results:
        if r.get("provider") != "triton":
            continue
        parts = [f"{r['median_s'] * 1e3:.3f} ms"]
        if "speedup_vs_eager" in r:
            parts.append(f"{r['speedup_vs_eager']:.1f}x eager")
        if "pct_of_copy_bandwidth" in r:
            parts.append(f"{r['pct_of_copy_bandwidth']:.0f}% of copy")
        compiled = next((c for c in results if c["group"] == r["group"] and c["provider"] == "compiled"), None)
        if compiled:
            parts.append(f"{compiled['median_s'] / r['median_s']:.1f}x torch.compile")
        rows.append((r["group"].removeprefix("kd_loss "), ", ".join(parts)))
    return rows


def _train_rows(results: list[dict]) -> list[tuple[str, str]]:
    rows = []
    for r in results:
        parts = [f"{r.get('images_per_s', float('nan')):,.0f} img/s"]
        for base in ("online_s0", "original_style"):
            key = f"speedup_vs_{base}"
            if key in r and r["provider"] != base:
                parts.append(f"{r[key]:.2f}x {base}")
        if "data_wait_fraction" in r:
            parts.append(f"{100 * r['data_wait_fraction']:.1f}% data wait")
        rows.append((f"train {r['provider']}", ", ".join(parts)))
    return rows


def build_report(out: Path, steps: list[dict], env: dict, quick: bool, total_s: float) -> dict:
    tests = read_tests(out)
    kd, train = read_bench(out / "bench_kd_loss.json"), read_bench(out / "bench_train.json")
    budget = BUDGET_S["quick" if quick else "full"]
    ok = (all(s["ok"] for s in steps) and tests["failed"] == 0 and tests["errors"] == 0 and tests["passed"] > 0
          and bool(kd) and bool(train))
    return {"ok": ok, "quick": quick, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "total_s": round(total_s, 1), "budget_s": budget, "environment": env, "steps": steps, "tests": tests,
            "kd_loss": kd, "train": train}


def verdict_table(report: dict) -> str:
    rows = [("device", f"{report['environment'].get('device', '?')} (torch {report['environment'].get('torch')}, "
                       f"Triton {report['environment'].get('triton')})")]
    for s in report["steps"]:
        state = "ok" if s["ok"] else ("TIMED OUT" if s["timed_out"] else f"FAILED (exit {s['returncode']})")
        rows.append((s["name"], f"{state}, {s['seconds']:.0f} s of {s['limit_s']:.0f}"))
    t = report["tests"]
    rows.append(("GPU tests", f"{t['passed']} passed, {t['failed']} failed, {t['errors']} errors, "
                              f"{t['skipped']} skipped"))
    rows += [(f"  FAIL {f['test']}", f["message"]) for f in t["failures"][:10]]
    rows += _kd_rows(report["kd_loss"]) or [("kd_loss bench", "no results")]
    rows += _train_rows(report["train"]) or [("train bench", "no results")]
    over = report["total_s"] > report["budget_s"]
    rows.append(("total time", f"{report['total_s']:.0f} s (budget {report['budget_s']} s{', OVER' if over else ''})"))
    rows.append(("verdict", "PASS" if report["ok"] else "FAIL"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for gpu_check.json, gpu_check.log and the raw results")
    parser.add_argument("--quick", action="store_true", help="a smaller selection, within 3 minutes")
    parser.add_argument("--shards", type=int, default=4, help="concurrent test processes (default 4)")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild gpu_check.json and the table from the files already in OUT")
    args = parser.parse_args(argv)
    if args.shards < 1:
        parser.error(f"--shards must be >= 1, got {args.shards}")
    out = Path(args.out)
    if args.report_only:
        previous = json.loads((out / "gpu_check.json").read_text()) if (out / "gpu_check.json").exists() else {}
        report = build_report(out, previous.get("steps", []), previous.get("environment", {}),
                              previous.get("quick", args.quick), previous.get("total_s", 0.0))
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
        print(verdict_table(report))
        return 0 if report["ok"] else 1

    import torch

    if not torch.cuda.is_available():
        print("bench/gpu_check.sh needs a CUDA GPU (torch.cuda.is_available() is False); "
              "on a CPU run `pytest` and `pytest bench/` instead", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("tests-*.xml"), *out.glob("tests-*.log"), out / "bench_kd_loss.json",
                  out / "bench_train.json"]:
        stale.unlink(missing_ok=True)
    started = time.monotonic()
    env = environment()
    records = []
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the GPU tests
    with open(out / "gpu_check.log", "w") as log:
        log.write(f"gpu_check {'--quick ' if args.quick else ''}on {env}\n")
        for step in plan(out, args.quick, args.shards):
            log.write(f"\n===== {step.name}: {' '.join(step.command)} (limit {step.limit_s:.0f} s)\n")
            log.flush()
            t0 = time.monotonic()
            if step.command[0] == "<sharded>":
                step.returncode, step.timed_out = _run_test_shards(out, args.quick, args.shards, step.limit_s, log)
            else:
                step.returncode, step.timed_out = _run(step.command, step.limit_s, log, step.env)
            step.seconds = round(time.monotonic() - t0, 1)
            log.write(f"===== {step.name}: exit {step.returncode}{' (timed out)' if step.timed_out else ''}, "
                      f"{step.seconds:.0f} s\n")
            records.append({**{k: v for k, v in asdict(step).items() if k != "env"}, "ok": step.ok})
            print(f"{step.name}: {'ok' if step.ok else 'FAILED'} ({step.seconds:.0f} s)", flush=True)
            if step.name == "install" and not step.ok:
                break
    report = build_report(out, records, env, args.quick, time.monotonic() - started)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    table = verdict_table(report)
    with open(out / "gpu_check.log", "a") as log:
        log.write("\n" + table + "\n")
    print(table)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
