"""Logs match the weights: a run interrupted by an exception, by SIGKILL, or resumed from previous.pt after a torn
last.pt ends with weights *and every log file* equal to an uninterrupted run's (timing fields aside): the records
written after the checkpoint are cut away on resume instead of appearing twice."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_engine import assert_bit_identical, tiny

from spacedkd_fast.engine import Callback, Trainer

TIMING = {"images_per_s", "elapsed_s", "data_wait_fraction"}  # wall-clock figures: they differ between runs
SETTINGS = dict(space=0.75, epochs=3, trace_batches=True, log_every=3, tensorboard=True)


def _records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in path.read_text().splitlines()]


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for events in sorted((folder / "tensorboard").glob("events.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if not tag.startswith("throughput"):
                scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return scalars


def assert_same_outputs(reference: Path, resumed: Path) -> None:
    assert (resumed / "batches.jsonl").read_text() == (reference / "batches.jsonl").read_text(), "batches.jsonl"
    assert _records(resumed / "metrics.jsonl") == _records(reference / "metrics.jsonl"), "metrics.jsonl"
    for name in ("epochs.csv", "steps.csv"):
        assert _rows(resumed / name) == _rows(reference / name), name
    assert _scalars(resumed) == _scalars(reference), "TensorBoard scalars"
    for role in ("teacher", "student"):
        a = torch.load(reference / "last.pt", weights_only=True)["roles"][role]["model"]
        b = torch.load(resumed / "last.pt", weights_only=True)["roles"][role]["model"]
        assert_bit_identical(a, b)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    pytest.importorskip("tensorboard", reason="the runs write TensorBoard events: needs the tensorboard package")
    out = tmp_path_factory.mktemp("uninterrupted")
    Trainer(tiny(**SETTINGS, out=str(out)), log=lambda *a: None).fit()
    return out


class CrashAt(Callback):
    """Raises inside the loop after ``actions`` optimizer steps (a bug in a callback, an OOM, ...)."""

    def __init__(self, actions: int) -> None:
        self.actions = actions

    def on_step_end(self, trainer, step):
        if trainer.actions >= self.actions:
            raise RuntimeError("crash for the test")


def _crash(out: Path, actions: int) -> None:
    trainer = Trainer(tiny(**SETTINGS, out=str(out)), callbacks=[CrashAt(actions)], log=lambda *a: None)
    with pytest.raises(RuntimeError, match="crash for the test"):
        trainer.fit()


def _resume(out: Path, lines: list | None = None) -> None:
    Trainer(tiny(**SETTINGS, out=str(out), resume=str(out)),
            log=(lines.append if lines is not None else lambda *a: None)).fit()


def test_a_crash_by_exception_resumes_with_the_uninterrupted_logs(tmp_path, uninterrupted):
    out = tmp_path / "run"
    _crash(out, actions=45)
    saved = torch.load(out / "last.pt", weights_only=True)["logs"]
    for name in ("metrics.jsonl", "batches.jsonl"):  # records were written after the checkpoint: the test cuts them
        assert (out / name).stat().st_size > saved[name], name
    _resume(out)
    assert_same_outputs(uninterrupted, out)


def test_a_fallback_to_previous_pt_cuts_the_logs_back_further(tmp_path, uninterrupted):
    out = tmp_path / "run"
    _crash(out, actions=45)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])  # torn, as by a full disk
    lines = []
    _resume(out, lines)
    assert any("resuming from previous.pt" in line for line in lines), lines
    assert_same_outputs(uninterrupted, out)


def test_a_double_fault_resumes_with_the_uninterrupted_logs(tmp_path, uninterrupted):
    """Crash, last.pt torn, the resumed run (from previous.pt) crashes again before its next checkpoint, resumed
    once more: the second crash's records go too, and the logs end as an uninterrupted run's."""
    out = tmp_path / "run"
    _crash(out, actions=45)
    data = (out / "last.pt").read_bytes()
    (out / "last.pt").write_bytes(data[: len(data) // 2])
    lines = []
    trainer = Trainer(tiny(**SETTINGS, out=str(out), resume=str(out)), callbacks=[CrashAt(40)], log=lines.append)
    with pytest.raises(RuntimeError, match="crash for the test"):
        trainer.fit()
    assert any("resuming from previous.pt" in line for line in lines), lines
    _resume(out)
    assert_same_outputs(uninterrupted, out)


@pytest.mark.slow
def test_sigkill_resumes_with_the_uninterrupted_logs(tmp_path, uninterrupted):
    """The command line, killed with SIGKILL (no handler runs) some steps after a checkpoint."""
    out = tmp_path / "run"
    flags = ["--subset", "256", "--batch-size", "32", "--model", "resnet8", "--lr", "0.05", "--eval-batch-size", "64",
             "--threads", "2", "--space", "0.75", "--epochs", "3", "--trace-batches", "--log-every", "3",
             "--tensorboard", "--no-progress", "--device", "cpu"]
    proc = subprocess.Popen([sys.executable, "-m", "spacedkd_fast.train", *flags, "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # the second epoch's checkpoint, then a few steps more
        trace = out / "batches.jsonl"
        if (out / "previous.pt").exists() and trace.exists() and len(trace.read_text().splitlines()) >= 40:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert len((out / "batches.jsonl").read_text().splitlines()) < 2 * 3 * 8 * 2  # it did not finish
    resumed = subprocess.run([sys.executable, "-m", "spacedkd_fast.train", "--resume", str(out), "--no-progress"],
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_outputs(uninterrupted, out)
