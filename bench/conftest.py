"""Benchmark harness over pytest-benchmark: device-synchronized timing, throughput units, speedups against the
baseline measured in the same run, and one results JSON per device and day with versions and commits.

Every benchmark calls the ``measure`` fixture::

    measure(fn, group="kd_loss fwd+bwd 1024x1000 float32", provider="cpp", baseline="eager",
            bytes_moved=..., items=...)

At the end of the session the results are printed as a table and written to
``bench/results/<device>-<date>.json`` (or ``--bench-out PATH``); a partial run replaces only the groups it
measured in an existing file.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch

RESULTS: list[dict] = []
RESULTS_DIR = Path(__file__).parent / "results"
ON_CUDA = torch.cuda.is_available()


def pytest_addoption(parser):
    parser.addoption("--bench-out", default=None, help="where to write the results JSON "
                                                       "(default: bench/results/<device>-<date>.json)")
    parser.addoption("--bench-max-time", type=float, default=0.4,
                     help="seconds of timed rounds per benchmark (after warm-up)")


def device_name() -> str:
    if ON_CUDA:
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def _commit() -> str:
    """The checkout's commit: ``SPACEDKD_COMMIT`` when the caller gives it (the GPU acceptance run does: its
    working-tree copy has no ``.git``), else git's, with ``-dirty`` for uncommitted changes to tracked files."""
    if os.environ.get("SPACEDKD_COMMIT"):
        return os.environ["SPACEDKD_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@pytest.fixture
def measure(benchmark, request):
    """Time ``fn`` (device-synchronized), record throughput, and return the median seconds."""
    max_time = request.config.getoption("--bench-max-time")

    def run(fn, *, group: str, provider: str, baseline: str | tuple[str, ...] | None = None,
            bytes_moved: float | None = None, items: float | None = None, items_unit: str = "items",
            warmup: int = 3, info: dict | None = None, setup=None, rounds: int | None = None, after=None):
        """``setup`` (optional) builds fresh arguments for each round, untimed: ``fn(*setup())``. ``after``
        (optional) returns more fields for the record once the rounds are done. Returns the record, which is
        also written to the results file at once (a run cut short keeps what it measured)."""
        make_args = setup or (lambda: ())

        def timed(*args):
            fn(*args)
            _sync()

        if rounds is None:
            for _ in range(warmup):  # compile, autotune, allocator warm-up
                fn(*make_args())
            _sync()
            start = time.perf_counter()
            timed(*make_args())
            once = max(time.perf_counter() - start, 1e-6)
            rounds = int(min(max(max_time / once, 5), 1000))
            warmup = 1
        benchmark.group = group
        benchmark.pedantic(timed, setup=lambda: (make_args(), {}), rounds=rounds, iterations=1, warmup_rounds=warmup)
        median = benchmark.stats.stats.median
        record = dict(group=group, provider=provider, baseline=baseline, median_s=median,
                      iqr_s=benchmark.stats.stats.iqr, rounds=rounds, **(info or {}), **(after() if after else {}))
        if bytes_moved is not None:
            record["GB_per_s"] = bytes_moved / median / 1e9
        if items is not None:
            record[f"{items_unit}_per_s"] = items / median
        benchmark.extra_info.update({k: v for k, v in record.items() if k not in ("group",)})
        RESULTS.append(record)
        _write_results(request.config)
        return record

    return run


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "nvidia.dali", "liger_kernel", "spacedkd_fast"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "installed")
        except Exception:  # noqa: BLE001 - absent is fine
            pass
    try:
        from spacedkd_fast import backends

        versions["spacedkd_fast._C"] = str(backends.cpp_extension())
    except Exception:  # noqa: BLE001
        pass
    if ON_CUDA:
        versions["cuda"] = torch.version.cuda
    return versions


def _add_speedups(results: list[dict]) -> None:
    by_group = {}
    for r in results:
        by_group.setdefault(r["group"], {})[r["provider"]] = r
    for r in results:
        baselines = r.get("baseline") or ()
        for name in (baselines,) if isinstance(baselines, str) else baselines:
            base = by_group[r["group"]].get(name)
            if base:
                r[f"speedup_vs_{name}"] = base["median_s"] / r["median_s"]
                if base.get("peak_above_grads_bytes") and "peak_above_grads_bytes" in r:  # fused-linear memory
                    r[f"memory_ratio_vs_{name}"] = r["peak_above_grads_bytes"] / base["peak_above_grads_bytes"]
    copies = [r for r in results if r["provider"] == "copy"]
    if copies:
        peak = max(r["GB_per_s"] for r in copies)
        for r in results:  # the ceiling of the memory-bound loss kernels
            if "GB_per_s" in r and r["group"].startswith("kd_loss"):
                r["pct_of_copy_bandwidth"] = 100.0 * r["GB_per_s"] / peak
            if "floor_bytes" in r:  # time / the time a copy of the unavoidable bytes takes (1.0 = the floor)
                r["x_copy_floor"] = r["median_s"] / (r["floor_bytes"] / (peak * 1e9))


def _earlier_results(out: Path) -> list[dict]:
    """The results already in ``out`` (same device), each with the commit and date it was measured at.

    A partial run (``pytest bench/ -k ...``) then updates the day's file instead of wiping it: the groups it
    measures replace the earlier ones whole, because the speedups inside a group compare providers measured in the
    same run.
    """
    if not out.exists():
        return []
    try:
        earlier = json.loads(out.read_text())
    except (OSError, ValueError):
        return []  # unreadable: overwrite it
    if earlier.get("device") != device_name():
        return []
    kept = earlier.get("results", [])
    for r in kept:  # files written before results carried their own commit
        r.setdefault("commit", earlier.get("commit"))
        r.setdefault("date", earlier.get("date"))
    return kept


def _results_path(config) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", "cuda-" + device_name() if ON_CUDA else "cpu").strip("-").lower()
    return Path(config.getoption("--bench-out") or RESULTS_DIR / f"{slug}-{datetime.date.today().isoformat()}.json")


_SESSION: dict = {}  # date, commit and the results file's earlier contents, fixed at the first write


def _write_results(config) -> dict:
    """(Re)write the results file with everything measured so far: after every benchmark, and at the end."""
    out = _results_path(config)
    if not _SESSION:
        _SESSION.update(date=datetime.datetime.now().isoformat(timespec="seconds"), commit=_commit(),
                        versions=_versions(), earlier=_earlier_results(out))
    results = [dict(r) for r in RESULTS]
    _add_speedups(results)
    for r in results:
        r.setdefault("commit", _SESSION["commit"])
        r.setdefault("date", _SESSION["date"])
    fresh = {r["group"] for r in results}
    payload = {
        "device": device_name(),
        "cpu_threads": torch.get_num_threads(),
        "date": _SESSION["date"],
        "commit": _SESSION["commit"],
        "versions": _SESSION["versions"],
        "command": "pytest " + " ".join(config.invocation_params.args),
        "byte_counting": "kd_loss fwd: N·V·(e_s + e_t); fwd+bwd: N·V·(2·e_s + 2·e_t + e_g) (two-pass count, "
                         "10 B/elt in bf16); copy: bytes read + written",
        "results": [r for r in _SESSION["earlier"] if r.get("group") not in fresh] + results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, out)  # a reader never sees half a file
    return payload


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    payload = _write_results(session.config)
    out = _results_path(session.config)
    shown = payload["results"][-len(RESULTS):]  # this session's, with their speedups
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    reporter.write_sep("=", f"spacedkd_fast benchmarks on {payload['device']} (commit {payload['commit']})")
    for r in shown:
        extra = [f"{r['median_s'] * 1e3:9.3f} ms"]
        for key, fmt in (("GB_per_s", "{:8.2f} GB/s"), ("images_per_s", "{:10.0f} img/s"),
                         ("pct_of_copy_bandwidth", "{:5.1f}% of copy"), ("x_copy_floor", "{:5.2f}x copy floor"),
                         ("data_wait_fraction", "{:.1%} waiting for data"), ("GFLOP_per_s", "{:7.1f} GFLOP/s")):
            if key in r and not (isinstance(r[key], float) and math.isnan(r[key])):
                extra.append(fmt.format(r[key]))
        if "peak_mem_bytes" in r:
            extra.append(f"peak {r['peak_mem_bytes'] / 2**20:8.1f} MiB")
        for key in r:
            if key.startswith("speedup_vs_"):
                extra.append(f"{r[key]:6.2f}x vs {key.removeprefix('speedup_vs_')}")
            if key.startswith("memory_ratio_vs_"):
                extra.append(f"memory {r[key]:5.3f}x of {key.removeprefix('memory_ratio_vs_')}")
        reporter.write_line(f"{r['group']:<44} {r['provider']:<14} " + "  ".join(extra))
    reporter.write_line(f"results written to {os.path.relpath(out)}")
