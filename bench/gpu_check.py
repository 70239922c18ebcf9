"""One-shot GPU acceptance run: ``bench/gpu_check.sh OUT_DIR [--quick] [--commit SHA] [--wheels DIR]``.

Made for a lent machine with one NVIDIA GPU, PyTorch and Triton preinstalled and no network (Python 3.12, torch
2.11, Triton 3.6, no DALI, no mlxtend), holding a copy of the working tree without ``.git``. In order:

0. preflight: CUDA usable, Triton importable, a C compiler and the Python headers (Triton builds its launcher
   with them), pytest-benchmark, setuptools, free disk; each check is one line, written even when the run cannot
   start;
1. carried wheels (``--wheels DIR``: ``pip install --no-index --no-deps --target``, put on ``PYTHONPATH``), then
   this checkout (``pip install --no-deps --no-build-isolation --no-index -e .``);
2. the headline figures, first so that they survive any cut: Triton kd_loss fwd+bwd against the eager reference at
   the classification and LLM shapes with the device's copy bandwidth, then spaced KD overlapped vs sequential vs
   online s = 0 training, then (not with ``--quick``) fused-linear KD against the materialized torch path at
   8192 × 4096 → 128256 bf16 and with a 2048-wide student;
3. the GPU-marked tests, then the Triton tests (each in concurrent shards: their time goes into compiling): every
   test the interpreter runs on a CPU (the masked vocabulary, top-k teacher and fused-linear cases, and the
   gradient-accuracy contract), compiled for the device;
4. the rest of the kd_loss sweep.

Not in the budget, run by hand when the lease has time left: the other training cases (``pytest
bench/bench_train.py -k test_train_throughput -m "not headline"``) and ``torch.compile`` of the reference
(``pytest bench/bench_kd_loss.py -m compile_heavy -k 8192x32000``; ~45 s of compiling for one figure).

Every step has a time limit derived from counts (``PLAN_COUNTS``, ``UNIT_COST_S``; see :func:`plan`); past it the
step gets SIGINT, so pytest still writes what it measured, then SIGKILL. Benchmarks write their results file after
every item and tests append one line per test as it finishes, so a cut step reports what it did.
``OUT_DIR/gpu_check.json`` is rewritten after every step (the report: verdict, provenance, environment, preflight,
plan, steps, tests with every failure and skip reason, benchmark results, Triton compiles per step) and
``OUT_DIR/gpu_check.log`` holds every command's output and the verdict table. Raw per-step files go to
``OUT_DIR/raw/``. PASS needs every check and required step present and passing, every collected test run with no
failure, and every headline figure measured.

Exit status: 0 PASS; 3 FAIL; 4 cannot start (a preflight check failed: see ``preflight`` in the report);
5 nothing to report (``--report-only`` on a folder without ``gpu_check.json``); 2 is argparse's (bad arguments).

``--report-only`` rebuilds the report and the table from the files a run left in OUT_DIR (no GPU needed).
``--digest`` prints the source digest recorded as provenance (compare it with a checkout here).
``--count-compiles`` re-measures the Triton compile counts of the test selections (``PLAN_COUNTS``) on a CPU,
through the interpreter.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = {"full": 360, "quick": 180}
GRACE_S = 10  # after SIGINT, before SIGKILL: a cut step costs its limit plus up to this (the budget allows one)
LIMIT_FACTOR = 1.25  # a step's limit is its estimate + 25 %: estimates sum to <= 80 % of the budget (20 % margin)
EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_START, EXIT_NO_REPORT = 0, 3, 4, 5
MIN_FREE_DISK_GB = 5.0  # Triton's cache, the editable install, raw logs; the LLM benchmarks live on the GPU

# ---- the budget: counts x unit costs ------------------------------------------------------------------------------
# Assumed per-unit costs on the H200 machine (16 cores). The first GPU run records each step's seconds and Triton
# compiles in gpu_check.json ("steps"): replace these with its figures.
UNIT_COST_S = dict(
    pytest_process=6.0,  # python + torch + CUDA context + collection, per pytest process
    triton_compile=3.0,  # one kd_loss kernel specialization, cold cache (1.5-3 s per compile seen before)
    kd_item=1.0,  # one kd_loss benchmark item: inputs, 3 warm-up calls, 0.3 s of timed rounds, statistics
    train_fit=4.0,  # one Trainer.fit of a training case (ResNet-18, 12,800 images, both roles), with its build
    gpu_test=5.0,  # one GPU test: a few tiny trainings on the GPU
    triton_test=0.3,  # one Triton test once its kernels are compiled
    torch_compile=45.0,  # one torch.compile (forward + backward, inductor) of the reference, cold
    install=15.0,  # the editable install without the C++ extension
    wheel=3.0,  # one carried wheel
    # one fused-linear benchmark item at 8192 x 4096 -> 128256 bf16: 2 GB of heads to fill, one warm-up, three
    # rounds (the materialized path ~0.2-0.4 s each) and the peak-memory call
    fused_item=2.0,
)
# How far concurrent shards are from a perfect split (one shard gets the slow tests), and how many kernels are
# compiled twice because two shards needed them before either had written Triton's cache.
SHARD_IMBALANCE = 1.3
CROSS_SHARD_RECOMPILES = 1.5
# Counts behind the estimates. The kd_loss compile counts are the distinct launch configurations of the items not
# compiled by an earlier step (Triton's cache persists across steps; tests/test_gpu_check.py checks them with the
# compile gate's grouping); test counts come from collecting the
# selections on a machine without DALI; Triton compiles of the test selections are distinct launch
# configurations recorded by `python bench/gpu_check.py --count-compiles` (+4 for test_gpu.py's LLM-shape and
# 64-bit-offset tests, which only run on a GPU).
PLAN_COUNTS = {
    "kd headline": dict(items=11, triton_compiles=4),  # copy + 5 shapes x (eager, triton), fwd+bwd
    "train headline": dict(fits=6),  # online s=0, spaced sequential, spaced overlap: warm-up + 1 timed fit each
    # fused-linear at 8192 x {4096, 2048} -> 128256 bf16, fused and eager (Liger, with its torch.compile, and the
    # kd_loss-on-materialized-logits provider are left to a manual `pytest bench/bench_fused_linear.py` there); one
    # kernel configuration (full 512-row chunks) for both shapes
    "fused headline": dict(fused_items=4, triton_compiles=1),
    "gpu tests": dict(tests=18, triton_compiles=4),  # the 37 collected minus 19 that need DALI
    "triton tests": dict(tests=251, triton_compiles=187),
    "triton tests --quick": dict(tests=81, triton_compiles=73),
    "kd sweep": dict(items=18, triton_compiles=8),  # the 9 other (shape, dtype) pairs, fwd+bwd, eager + triton
}
QUICK_TRITON_FILTER = ("not hyperparameters and not online_blocks and not grad_contract and not masked and not topk "
                       "and not vocab and not float64")


@dataclass
class Step:
    name: str
    command: list[str]
    estimate_s: float
    required: bool = True
    env: dict = field(default_factory=dict)
    kind: str = "command"  # "command", "tests" (sharded pytest with per-test records), "bench" (a results file)
    selection: list[str] = field(default_factory=list)  # kind "tests": pytest arguments of the selection
    expect: int = 0  # kind "bench": results the step must produce (0: at least one)
    limit_s: float = 0.0
    seconds: float = 0.0
    returncode: int | None = None
    timed_out: bool = False
    triton_compiles: int | None = None

    def __post_init__(self):
        self.limit_s = self.limit_s or round(self.estimate_s * LIMIT_FACTOR)

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "-")


def _estimate(*, processes=1, shards=1, **counts) -> float:
    """Seconds for ``counts`` of work (keys of UNIT_COST_S, plus ``fits``/``items``/``tests``) on ``shards``
    concurrent processes."""
    unit = UNIT_COST_S
    work = (counts.get("items", 0) * unit["kd_item"] + counts.get("fits", 0) * unit["train_fit"]
            + counts.get("fused_items", 0) * unit["fused_item"]
            + counts.get("gpu_tests", 0) * unit["gpu_test"] + counts.get("triton_tests", 0) * unit["triton_test"]
            + counts.get("torch_compiles", 0) * unit["torch_compile"])
    compiles = counts.get("triton_compiles", 0) * unit["triton_compile"]
    if shards > 1:
        compiles *= CROSS_SHARD_RECOMPILES
        return processes * unit["pytest_process"] + (work + compiles) * SHARD_IMBALANCE / shards
    return processes * unit["pytest_process"] + work + compiles


def _bench_step(name, module, marker, out: Path, extra=(), required=True, expect=0, max_time="0.3", **counts):
    py = sys.executable
    command = [py, "-m", "pytest", f"bench/{module}", "-p", "no:cacheprovider", "-q", "-m", marker,
               "--bench-out", str(out / "raw" / f"{name.replace(' ', '-')}.json"), "--bench-max-time", max_time,
               *extra]
    return Step(name, command, _estimate(**counts), required=required, kind="bench", expect=expect)


def plan(out: Path, quick: bool, shards: int, wheels: Path | None = None) -> list[Step]:
    """The steps of a run, in order, each with its estimate (from PLAN_COUNTS x UNIT_COST_S) and limit."""
    py = sys.executable
    c = PLAN_COUNTS
    steps = []
    if wheels is not None:
        count = len(list(wheels.glob("*.whl")))
        steps.append(Step("wheels", [py, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
                                     "--target", str(out / "raw" / "site"), *sorted(str(w) for w in
                                                                                      wheels.glob("*.whl"))],
                          count * UNIT_COST_S["wheel"] + UNIT_COST_S["install"] / 3))
    steps.append(Step("install", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                                  "-e", "."], UNIT_COST_S["install"],
                      env={"SPACEDKD_BUILD_EXT": "0"}))  # the C++ kernel is for CPUs: not built here
    steps.append(_bench_step("kd headline", "bench_kd_loss.py", "headline", out, expect=c["kd headline"]["items"],
                             **c["kd headline"]))
    steps.append(_bench_step("train headline", "bench_train.py", "headline", out, expect=3, **c["train headline"]))
    if not quick:
        fused = c["fused headline"]
        steps.append(_bench_step("fused headline", "bench_fused_linear.py", "headline", out,
                                 extra=["-k", "not liger and not kd_loss"], expect=fused["fused_items"], **fused))
    gpu = c["gpu tests"]
    steps.append(Step("gpu tests", [], _estimate(shards=shards, gpu_tests=gpu["tests"],
                                                 triton_compiles=gpu["triton_compiles"]),
                      kind="tests", selection=["tests", "-m", "gpu"]))
    triton = c["triton tests --quick" if quick else "triton tests"]
    selection = ["tests", "-m", "triton and not gpu"] + (["-k", QUICK_TRITON_FILTER] if quick else [])
    steps.append(Step("triton tests", [], _estimate(shards=shards, triton_tests=triton["tests"],
                                                    triton_compiles=triton["triton_compiles"]),
                      kind="tests", selection=selection))
    if not quick:
        steps.append(_bench_step("kd sweep", "bench_kd_loss.py", "not headline and not compile_heavy", out,
                                 extra=["-k", "fwd_bwd and not cpp"], **c["kd sweep"]))
    return steps


def budget_check(steps: list[Step], quick: bool) -> dict:
    """Estimates, limits and the budget: the limits plus one SIGINT grace must fit the budget."""
    budget = BUDGET_S["quick" if quick else "full"]
    estimate = sum(s.estimate_s for s in steps)
    limits = sum(s.limit_s for s in steps) + GRACE_S
    return dict(budget_s=budget, estimate_s=round(estimate, 1), limits_s=round(limits, 1),
                margin=round(1 - estimate / budget, 3), fits=limits <= budget)


# ---- provenance -------------------------------------------------------------------------------------------------
DIGEST_PARTS = ("spacedkd_fast", "kernels", "csrc", "bench", "tests", "examples", "setup.py", "pyproject.toml")


def source_digest(root: Path | None = None) -> str:
    """sha256 over the source files (paths and bytes, sorted; no caches or results): the same for a checkout of a
    commit and for the GPU machine's copy of it, so a report without ``.git`` can still be traced to a commit."""
    root = root or ROOT
    h = hashlib.sha256()
    for part in DIGEST_PARTS:
        path = root / part
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []
        for f in files:
            rel = f.relative_to(root).as_posix()
            if "__pycache__" in rel or rel.startswith("bench/results/") or ".egg-info" in rel or f.suffix in (
                    ".so", ".pyc"):
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def provenance(commit_arg: str | None) -> dict:
    """The commit (from ``--commit``, ``SPACEDKD_COMMIT``, a ``COMMIT`` file at the root, or git) and the source
    digest."""
    commit, source = commit_arg, "--commit"
    if not commit and os.environ.get("SPACEDKD_COMMIT"):
        commit, source = os.environ["SPACEDKD_COMMIT"], "SPACEDKD_COMMIT"
    if not commit and (ROOT / "COMMIT").is_file():
        commit, source = (ROOT / "COMMIT").read_text().strip(), "COMMIT file"
    if not commit:
        try:
            result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10)
            commit, source = (result.stdout.strip(), "git") if result.returncode == 0 else (None, None)
        except (OSError, subprocess.SubprocessError):
            commit, source = None, None
    return {"commit": commit or "unknown", "commit_source": source or "none (pass --commit SHA)",
            "source_digest": source_digest()}


# ---- preflight --------------------------------------------------------------------------------------------------
def _check(name: str, fn) -> dict:
    try:
        ok, detail = fn()
    except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check, with its reason
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    return {"name": name, "ok": bool(ok), "detail": str(detail)}


def _cuda_check():
    """CUDA in a child process with a timeout: a broken driver can hang the first CUDA call."""
    code = ("import torch,json;ok=torch.cuda.is_available();d={'available':ok,'count':torch.cuda.device_count()}\n"
            "if ok:\n x=torch.ones(1024,device='cuda');d['sum']=float(x.sum());p=torch.cuda.get_device_properties(0)\n"
            " d.update(name=p.name,capability=f'{p.major}.{p.minor}',memory_gb=round(p.total_memory/1e9,1),"
            "free_gb=round(torch.cuda.mem_get_info()[0]/1e9,1),sm_count=p.multi_processor_count)\n"
            "print(json.dumps(d))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return False, f"CUDA initialisation failed: {tail}"
    info = json.loads(result.stdout.strip().splitlines()[-1])
    if not info["available"]:
        return False, "torch.cuda.is_available() is False (no GPU, or driver/CUDA mismatch); on a CPU run " \
                      "`pytest` and `pytest bench/` instead"
    if info.get("sum") != 1024.0:
        return False, f"a CUDA sum of 1024 ones gave {info.get('sum')}"
    return True, (f"{info['name']} (sm {info['capability']}, {info['sm_count']} SMs, {info['memory_gb']} GB, "
                  f"{info['free_gb']} GB free), {info['count']} device(s)")


def _driver_version() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    return None


def _c_compiler_check():
    """What Triton's launcher build needs: a C compiler (``CC``, else cc/gcc/clang, as Triton looks) that can
    compile an extension against this Python's headers."""
    cc = os.environ.get("CC") or next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cc:
        return False, "no C compiler (set CC, or install gcc): Triton compiles its kernel launcher with one"
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        return False, f"{include}/Python.h is missing: Triton's launcher needs the Python headers (python3-dev)"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "probe.c"
        src.write_text("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        result = subprocess.run([cc, "-fPIC", "-shared", f"-I{include}", str(src), "-o", str(Path(tmp) / "p.so")],
                                capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return False, f"{cc} cannot compile against {include}: {result.stderr.strip()[:200]}"
    return True, f"{cc} compiles against {include}/Python.h"


def _import_check(module: str, why: str):
    import importlib

    mod = importlib.import_module(module)
    return True, f"{module} {getattr(mod, '__version__', '')}".strip() + f" ({why})"


def _setuptools_check():
    import setuptools

    version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
    need = (66, 1) if sys.version_info >= (3, 12) else (64, 0)
    ok = version >= need
    return ok, (f"setuptools {setuptools.__version__} (the editable install uses it: --no-build-isolation; needs >= "
                f"{need[0]}.{need[1]})")


def _disk_check(out: Path):
    free = shutil.disk_usage(out).free / 1e9
    return free >= MIN_FREE_DISK_GB, f"{free:.1f} GB free at {out} (needs {MIN_FREE_DISK_GB:g})"


def preflight(out: Path, wheels: Path | None) -> list[dict]:
    checks = [
        _check("python", lambda: (True, f"{platform.python_version()} at {sys.executable}")),
        _check("torch", lambda: _import_check("torch", "preinstalled")),
        _check("cuda", _cuda_check),
        _check("triton", lambda: _import_check("triton", "the GPU kernels")),
        _check("c compiler", _c_compiler_check),
        _check("pytest-benchmark", lambda: _import_check("pytest_benchmark", "the benchmarks")),
        _check("setuptools", _setuptools_check),
        _check("disk", lambda: _disk_check(out)),
    ]
    if wheels is not None:
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        checks.append({"name": "wheels", "ok": bool(found),
                       "detail": f"{len(found)} wheel(s) in {wheels}: {', '.join(w.name for w in found)}" if found
                       else f"--wheels {wheels}: no .whl files there"})
    return checks


def environment() -> dict:
    info = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        info.update(torch=torch.__version__, cuda=torch.version.cuda)
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(device=props.name, sm_count=props.multi_processor_count,
                        memory_gb=round(props.total_memory / 1e9, 1), capability=f"{props.major}.{props.minor}")
    except Exception as exc:  # noqa: BLE001 - the preflight says what is wrong
        info["torch"] = f"unusable: {exc}"
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    info["driver"] = _driver_version()
    return info


# ---- running ----------------------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen) -> int:
    """SIGINT to the process group (pytest then writes its reports), SIGKILL after the grace period."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def _run(command: list[str], limit_s: float, log, env: dict) -> tuple[int, bool]:
    """Run ``command`` from the repository root, its output into ``log``; past ``limit_s`` it is stopped."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env},
                            start_new_session=True)
    try:
        return proc.wait(timeout=limit_s), False
    except subprocess.TimeoutExpired:
        return _stop(proc), True


def collect(selection: list[str], env: dict | None = None) -> tuple[list[str], list[str], int]:
    """``(test ids, collection errors, pytest's return code)`` of a selection."""
    result = subprocess.run([sys.executable, "-m", "pytest", *selection, "--collect-only", "-q",
                             "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=180,
                            env={**os.environ, **(env or {})})
    ids = [line.strip() for line in result.stdout.splitlines() if "::" in line and not line.startswith("ERROR")]
    errors = [line.strip() for line in result.stdout.splitlines() if line.startswith("ERROR")]
    if result.returncode not in (0, 5) and not errors:  # an error pytest did not list as "ERROR path"
        errors = [(result.stdout + result.stderr).strip().splitlines()[-1:] or [f"exit {result.returncode}"]][0]
    return ids, errors, result.returncode


def _run_test_shards(step: Step, out: Path, shards: int, log, env: dict) -> tuple[int, bool]:
    """Collect the selection once (a collection error fails the step, naming the module), then run the test ids
    as ``shards`` concurrent pytest processes, each appending a line per test to the step's results file."""
    raw = out / "raw"
    try:
        ids, errors, code = collect(step.selection, env)
    except subprocess.TimeoutExpired:
        ids, errors, code = [], ["collection did not finish in 180 s"], 1
    (raw / f"{step.slug}-collected.txt").write_text("".join(f"{i}\n" for i in ids))
    if errors:
        (raw / f"{step.slug}-collect-errors.txt").write_text("\n".join(errors) + "\n")
    log.write(f"collected {len(ids)} tests into {min(shards, len(ids))} shards"
              f"{f'; COLLECTION ERRORS: {errors}' if errors else ''}\n")
    log.flush()
    if errors or not ids:
        return code or 1, False
    started = time.monotonic()
    results = raw / f"{step.slug}.jsonl"
    procs = []
    for i in range(shards):
        chunk = ids[i::shards]
        if not chunk:
            continue
        shard_log = open(raw / f"{step.slug}-{i}.log", "w")  # noqa: SIM115 - closed below
        cmd = [sys.executable, "-m", "pytest", *chunk, "-p", "no:cacheprovider", "-q", "-rfEs"]
        procs.append((subprocess.Popen(cmd, cwd=ROOT, stdout=shard_log, stderr=subprocess.STDOUT,
                                       env={**os.environ, **env, "SPACEDKD_TEST_RESULTS": str(results),
                                            "SPACEDKD_REQUIRE_TRITON": "1"},
                                       start_new_session=True), shard_log))
    codes, timed_out = [], False
    for proc, shard_log in procs:
        remaining = max(step.limit_s - (time.monotonic() - started), 1)
        try:
            codes.append(proc.wait(timeout=remaining))
        except subprocess.TimeoutExpired:
            timed_out = True
            codes.append(_stop(proc))
        shard_log.close()
        log.write(Path(shard_log.name).read_text())
    return max(codes, default=1), timed_out


def _count_cubins(cache: Path) -> int:
    return sum(1 for _ in cache.rglob("*.cubin")) if cache.exists() else 0


# ---- the report -------------------------------------------------------------------------------------------------
def read_tests(out: Path, slug: str) -> dict:
    """Outcome counts of a test step from its per-test records and its collected ids: failures and skips with their
    messages, and the tests that never reported (the step was cut, or a shard died)."""
    raw = out / "raw"
    collected_file = raw / f"{slug}-collected.txt"
    collected = collected_file.read_text().splitlines() if collected_file.exists() else []
    errors_file = raw / f"{slug}-collect-errors.txt"
    collect_errors = errors_file.read_text().splitlines() if errors_file.exists() else []
    outcome: dict[str, dict] = {}
    results = raw / f"{slug}.jsonl"
    unreadable = 0
    for line in (results.read_text().splitlines() if results.exists() else []):
        try:
            r = json.loads(line)
        except ValueError:
            unreadable += 1  # a line cut by a kill: that test counts as not run
            continue
        if r["when"] == "collect":
            collect_errors.append(f"{r['test']}: {r.get('message', '')}")
            continue
        previous = outcome.get(r["test"])
        # setup failures/skips and call outcomes are what counts; a teardown error is an error too
        if previous is None or r["outcome"] != "passed":
            outcome[r["test"]] = r
    counts = dict(collected=len(collected), passed=0, failed=0, errors=0, skipped=0)
    failures, skips = [], []
    for test, r in outcome.items():
        if r["outcome"] == "passed":
            counts["passed"] += 1
        elif r["outcome"] == "skipped":
            counts["skipped"] += 1
            skips.append({"test": test, "reason": r.get("message", "")})
        elif r["when"] == "call":
            counts["failed"] += 1
            failures.append({"test": test, "message": r.get("message", "")})
        else:
            counts["errors"] += 1
            failures.append({"test": test, "message": f"{r['when']}: {r.get('message', '')}"})
    not_run = [t for t in collected if t not in outcome]
    return {**counts, "not_run": len(not_run), "not_run_tests": not_run[:20], "failures": failures,
            "skips": skips, "collect_errors": collect_errors, "unreadable_lines": unreadable}


def read_bench(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text()).get("results", [])
    except (OSError, ValueError):
        return []


def step_problems(step: dict, tests: dict | None, bench: list[dict] | None) -> list[str]:
    """Why a step does not pass (empty: it passes)."""
    if step.get("returncode") is None:
        return ["did not run"]
    problems = []
    if step.get("timed_out"):
        problems.append(f"cut at its {step['limit_s']:.0f} s limit")
    elif step["returncode"] != 0:
        problems.append(f"exit {step['returncode']}")
    if tests is not None:
        if tests["collect_errors"]:
            problems.append(f"collection errors: {'; '.join(tests['collect_errors'][:3])}")
        if tests["collected"] == 0:
            problems.append("no tests collected")
        if tests["not_run"]:
            problems.append(f"{tests['not_run']} collected tests never reported")
        if tests["failed"] or tests["errors"]:
            problems.append(f"{tests['failed']} failed, {tests['errors']} errors")
    if bench is not None:
        expect = step.get("expect", 0)
        if not bench:
            problems.append("no results (the results file is missing or empty)")
        elif expect and len(bench) < expect:
            problems.append(f"{len(bench)} of {expect} results")
    return problems


def build_report(out: Path, state: dict) -> dict:
    """The report from ``state`` (preflight, planned steps and what ran) and the raw files in ``out``."""
    tests, benchmarks, steps = {}, {}, []
    for step in state.get("steps", []):
        step = dict(step)
        slug = step["name"].replace(" ", "-")
        t = read_tests(out, slug) if step.get("kind") == "tests" else None
        b = read_bench(out / "raw" / f"{slug}.json") if step.get("kind") == "bench" else None
        if t is not None:
            tests[step["name"]] = t
        if b is not None:
            benchmarks[step["name"]] = b
        step["problems"] = step_problems(step, t, b)
        step["ok"] = not step["problems"]
        steps.append(step)
    preflight_ok = bool(state.get("preflight")) and all(c["ok"] for c in state["preflight"])
    if not preflight_ok:
        verdict = "CANNOT START"
    elif steps and all(s["ok"] for s in steps if s.get("required", True)):
        verdict = "PASS"
    else:
        verdict = "FAIL"
    code = {"PASS": EXIT_PASS, "FAIL": EXIT_FAIL, "CANNOT START": EXIT_CANNOT_START}[verdict]
    derived = ("verdict", "ok", "exit_code", "steps", "tests", "benchmarks")  # recomputed, never carried over
    return {"verdict": verdict, "ok": verdict == "PASS", "exit_code": code,
            **{k: v for k, v in state.items() if k not in derived}, "steps": steps, "tests": tests,
            "benchmarks": benchmarks}


def _kd_rows(results: list[dict]) -> list[tuple[str, str]]:
    rows = []
    copy = next((r for r in results if r.get("provider") == "copy"), None)
    if copy:
        rows.append(("  copy bandwidth", f"{copy['GB_per_s']:.0f} GB/s"))
    for r in results:
        if r.get("provider") not in ("triton", "cpp", "compiled", "liger"):
            continue
        parts = [f"{r['provider']} {r['median_s'] * 1e3:.3f} ms"]
        if "speedup_vs_eager" in r:
            parts.append(f"{r['speedup_vs_eager']:.1f}x eager")
        if "pct_of_copy_bandwidth" in r:
            parts.append(f"{r['pct_of_copy_bandwidth']:.0f}% of copy")
        if "graphs_compiled" in r:
            parts.append(f"{r['graphs_compiled']} graph(s) compiled")
        rows.append((f"  {r['group'].removeprefix('kd_loss ')}", ", ".join(parts)))
    return rows


def _fused_rows(results: list[dict]) -> list[tuple[str, str]]:
    rows = []
    for r in results:
        parts = [f"{r['provider']} {r['median_s'] * 1e3:.1f} ms"]
        if "GFLOP_per_s" in r:
            parts.append(f"{r['GFLOP_per_s'] / 1e3:.0f} TFLOP/s")
        if "peak_mem_bytes" in r:
            parts.append(f"peak {r['peak_mem_bytes'] / 2**30:.2f} GiB")
        if r["provider"] != "eager" and "speedup_vs_eager" in r:
            parts.append(f"{r['speedup_vs_eager']:.2f}x eager's speed")
        if r["provider"] != "eager" and "memory_ratio_vs_eager" in r:
            parts.append(f"{r['memory_ratio_vs_eager']:.3f}x eager's memory")
        rows.append((f"  {r['group'].removeprefix('fused-linear ')}", ", ".join(parts)))
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
        rows.append((f"  {r['provider']}", ", ".join(parts)))
    return rows


def verdict_table(report: dict) -> str:
    env = report.get("environment", {})
    prov = report.get("provenance", {})
    rows = [("device", f"{env.get('device', '?')} (torch {env.get('torch')}, Triton {env.get('triton')}, "
                       f"CUDA {env.get('cuda')}, driver {env.get('driver')})"),
            ("commit", f"{prov.get('commit', 'unknown')} ({prov.get('commit_source', '?')}), source digest "
                       f"{prov.get('source_digest', '?')}")]
    for c in report.get("preflight", []):
        rows.append((f"preflight {c['name']}", f"{'ok' if c['ok'] else 'FAILED'}: {c['detail']}"))
    for s in report["steps"]:
        state = "ok" if s["ok"] else ("FAILED: " + "; ".join(s["problems"]))
        if not s.get("required", True) and not s["ok"]:
            state = "optional, " + state
        compiles = f", {s['triton_compiles']} Triton compiles" if s.get("triton_compiles") is not None else ""
        rows.append((s["name"], f"{state} ({s.get('seconds', 0):.0f} s of {s['limit_s']:.0f}{compiles})"))
        t = report["tests"].get(s["name"])
        if t is not None:
            rows.append(("  tests", f"{t['collected']} collected: {t['passed']} passed, {t['failed']} failed, "
                                    f"{t['errors']} errors, {t['skipped']} skipped, {t['not_run']} not run"))
            rows += [(f"  FAIL {f['test']}", f["message"]) for f in t["failures"][:10]]
            reasons: dict[str, int] = {}
            for skip in t["skips"]:
                reasons[skip["reason"]] = reasons.get(skip["reason"], 0) + 1
            rows += [(f"  skipped x{n}", reason) for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        b = report["benchmarks"].get(s["name"])
        if b:
            rows += (_train_rows(b) if s["name"].startswith("train") else
                     _fused_rows(b) if s["name"].startswith("fused") else _kd_rows(b))
    total, budget = report.get("total_s", 0.0), report.get("budget", {}).get("budget_s", 0)
    rows.append(("total time", f"{total:.0f} s (budget {budget} s{', OVER' if budget and total > budget else ''})"))
    rows.append(("verdict", report["verdict"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _write_report(out: Path, state: dict) -> dict:
    report = build_report(out, state)
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")
    os.replace(tmp, out / "gpu_check.json")
    return report


# ---- the interpreter count of Triton compiles ---------------------------------------------------------------------
def count_compiles() -> dict:
    """Distinct Triton launch configurations of the test selections, recorded through the interpreter on a CPU
    (what a GPU compiles, minus test_gpu.py's GPU-only tests)."""
    counts = {}
    for name, extra in (("triton tests", []), ("triton tests --quick", ["-k", QUICK_TRITON_FILTER])):
        with tempfile.TemporaryDirectory() as tmp:
            record = Path(tmp) / "launches.jsonl"
            subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "triton and not gpu", *extra, "-q",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, timeout=1800,
                           env={**os.environ, "TRITON_INTERPRET": "1", "SPACEDKD_RECORD_LAUNCHES": str(record)})
            lines = [json.loads(x) for x in record.read_text().splitlines()] if record.exists() else []
        ids, _, _ = collect(["tests", "-m", "triton and not gpu", *extra], {"TRITON_INTERPRET": "1"})
        counts[name] = dict(tests=len(ids), triton_compiles=len({(r["kernel"], json.dumps(r["config"]),
                                                                  r["signature"]) for r in lines}))
    return counts


# ---- main -------------------------------------------------------------------------------------------------------
OUTPUTS = ("gpu_check.json", "gpu_check.log", "gpu_check.json.tmp")


def _clear_stale(out: Path) -> None:
    """Remove everything an earlier run left in ``out`` (its report, log and raw files)."""
    for name in OUTPUTS:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "raw", ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                     epilog="exit status: 0 PASS, 3 FAIL, 4 cannot start (preflight), 5 nothing to "
                                            "report (--report-only), 2 bad arguments")
    parser.add_argument("out", nargs="?", help="folder for gpu_check.json, gpu_check.log and raw/")
    parser.add_argument("--quick", action="store_true", help="headline figures and the tests, within 3 minutes")
    parser.add_argument("--shards", type=int, default=None,
                        help="concurrent test processes (default: the CPU count minus 4, between 1 and 12)")
    parser.add_argument("--commit", default=None, help="the commit of this working tree (its copy has no .git)")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a folder of wheels to install first (--no-index --no-deps), e.g. liger-kernel")
    parser.add_argument("--report-only", action="store_true",
                        help="only rebuild gpu_check.json and the table from the files already in OUT")
    parser.add_argument("--digest", action="store_true", help="print the source digest of this checkout and exit")
    parser.add_argument("--count-compiles", action="store_true",
                        help="count the Triton compiles of the test selections (interpreter, CPU) and exit")
    args = parser.parse_args(argv)
    if args.digest:
        print(source_digest())
        return 0
    if args.count_compiles:
        print(json.dumps(count_compiles(), indent=1))
        return 0
    if args.out is None:
        parser.error("the output folder OUT is required")
    shards = args.shards if args.shards is not None else max(1, min(12, (os.cpu_count() or 1) - 4))
    if shards < 1:
        parser.error(f"--shards must be >= 1, got {shards}")
    out = Path(args.out)
    if args.report_only:
        path = out / "gpu_check.json"
        if not path.exists():
            print(f"gpu_check: FAIL: {path} does not exist: nothing to report", file=sys.stderr)
            return EXIT_NO_REPORT
        try:
            state = json.loads(path.read_text())
        except ValueError as exc:
            print(f"gpu_check: FAIL: {path} is not readable JSON ({exc})", file=sys.stderr)
            return EXIT_NO_REPORT
        report = _write_report(out, state)
        print(verdict_table(report))
        return report["exit_code"]

    if out.exists() and not out.is_dir():
        parser.error(f"OUT {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    _clear_stale(out)
    (out / "raw").mkdir()
    started = time.monotonic()
    steps = plan(out, args.quick, shards, args.wheels)
    state = {"quick": args.quick, "date": datetime.datetime.now().isoformat(timespec="seconds"),
             "provenance": provenance(args.commit), "environment": environment(), "shards": shards,
             "budget": budget_check(steps, args.quick), "unit_cost_s": UNIT_COST_S, "plan_counts": PLAN_COUNTS,
             "preflight": [], "steps": []}
    log = open(out / "gpu_check.log", "w")  # noqa: SIM115 - closed at the end
    log.write(f"gpu_check {' '.join(argv if argv is not None else sys.argv[1:])}\n"
              f"{json.dumps({k: state[k] for k in ('provenance', 'environment', 'budget')})}\n")
    state["preflight"] = preflight(out, args.wheels)
    for c in state["preflight"]:
        line = f"preflight {c['name']}: {'ok' if c['ok'] else 'FAILED'}: {c['detail']}"
        log.write(line + "\n")
        print(line, flush=True)
    state["steps"] = [{**_step_record(s)} for s in steps]
    _write_report(out, state)
    if all(c["ok"] for c in state["preflight"]):
        triton_cache = out / "raw" / "triton-cache"  # fresh: its cubins count this run's compiles
        env = {"SPACEDKD_COMMIT": state["provenance"]["commit"], "TRITON_CACHE_DIR": str(triton_cache),
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "PYTHONUNBUFFERED": "1"}  # deterministic cuBLAS for the tests
        if args.wheels is not None:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(out / "raw" / "site"),
                                                              os.environ.get("PYTHONPATH")]))
        for i, step in enumerate(steps):
            log.write(f"\n===== {step.name}: {' '.join(step.command) or ' '.join(step.selection)} "
                      f"(limit {step.limit_s:.0f} s, estimate {step.estimate_s:.0f} s)\n")
            log.flush()
            before, t0 = _count_cubins(triton_cache), time.monotonic()
            if step.kind == "tests":
                step.returncode, step.timed_out = _run_test_shards(step, out, shards, log, env)
            else:
                step.returncode, step.timed_out = _run(step.command, step.limit_s, log, {**env, **step.env})
            step.seconds = round(time.monotonic() - t0, 1)
            step.triton_compiles = _count_cubins(triton_cache) - before
            log.write(f"===== {step.name}: exit {step.returncode}{' (cut at its limit)' if step.timed_out else ''}, "
                      f"{step.seconds:.0f} s, {step.triton_compiles} Triton compiles\n")
            state["steps"][i] = _step_record(step)
            state["total_s"] = round(time.monotonic() - started, 1)
            report = _write_report(out, state)
            done = report["steps"][i]
            print(f"{step.name}: {'ok' if done['ok'] else 'FAILED: ' + '; '.join(done['problems'])} "
                  f"({step.seconds:.0f} s)", flush=True)
            if step.name in ("wheels", "install") and not done["ok"]:
                break  # nothing after it can run
    state["total_s"] = round(time.monotonic() - started, 1)
    report = _write_report(out, state)
    table = verdict_table(report)
    log.write("\n" + table + "\n")
    log.close()
    print(table)
    return report["exit_code"]


def _step_record(step: Step) -> dict:
    return {k: v for k, v in asdict(step).items() if k != "env"}


if __name__ == "__main__":
    sys.exit(main())
