"""The examples run as a user runs them (tiny settings), and do what they say."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=600)


def test_own_loop_replays_exactly_the_teachers_batches(tmp_path):
    trace = tmp_path / "trace.txt"
    result = run("own_loop.py", "--subset", "640", "--epochs", "2", "--space", "0.5", "--trace", str(trace))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("student test accuracy") == 2
    lines = trace.read_text().splitlines()
    teacher = [line.split()[1] for line in lines if line.startswith("teacher")]
    student = [line.split()[1] for line in lines if line.startswith("student")]
    assert len(teacher) == 20 and len(set(teacher)) == 20  # 640 digits / 64 per batch, 2 epochs
    assert student == teacher, "the student replays the teacher's batches, byte-identical, in order"
    # Replays come after their block: the first student batch follows the 5th teacher batch (s = 0.5: N = 5).
    assert [line.split()[0] for line in lines[:6]] == ["teacher"] * 5 + ["student"]


def test_llm_logits_example_matches_the_reference():
    result = run("llm_logits.py", "--batch", "3", "--seq", "24", "--vocab", "500")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    loss = float(out.split("loss ")[1].split()[0])
    reference = float(out.split("reference ")[1].split(")")[0])
    assert abs(loss - reference) <= 2e-5 * max(1.0, abs(reference)), out
    assert "bfloat16" in out and "zero at padding: True" in out


def test_llm_distill_example_learns_from_the_teacher():
    """The fused-linear loss equals kd_loss on materialized logits, and the student learns from the teacher through
    it (padding ignored, the head's gradient on lm_head.weight, a teacher vocabulary 16 ids larger truncated to the
    student's)."""
    import re

    result = run("llm_distill.py", "--teacher-steps", "40", "--steps", "30", "--seq", "16", "--batch", "16",
                 "--vocab", "128", "--chunk-size", "50")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "(same: True)" in out and "lm_head.weight.grad set: True" in out, out
    assert "teacher vocabulary 144, student 128" in out, out
    first, last = (float(x) for x in re.search(r"distillation loss ([\d.]+) -> ([\d.]+)", out).groups())
    before, after = (float(x) for x in re.search(r"accuracy ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < 0.8 * first and after > before + 0.1, out


def test_timm_example_replays_exactly_and_resumes_bit_identically(tmp_path):
    import json

    import torch

    tiny = ("--subset", "256", "--epochs", "2", "--trace")
    full = run("timm_tensordataset.py", *tiny, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    assert "student test accuracy" in full.stdout
    part = tmp_path / "part"
    stopped = run("timm_tensordataset.py", *tiny, "--out", str(part), "--stop-after", "10")
    assert stopped.returncode == 0 and "interrupted: stopped by --stop-after 10" in stopped.stdout, stopped.stderr
    resumed = run("timm_tensordataset.py", *tiny, "--out", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def trace(folder):
        return [json.loads(line) for line in (folder / "batches.jsonl").read_text().splitlines()]

    records = trace(tmp_path / "full")
    teacher = [r["batch"] for r in records if r["role"] == "teacher"]
    student = [r["batch"] for r in records if r["role"] == "student"]
    assert len(teacher) == 8 and student == teacher  # 256 / 64 a batch, 2 epochs; replayed byte-identical, in order
    assert trace(part) == records  # the interrupted and resumed run trained on the same batches
    for role in ("teacher", "student"):
        a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["roles"][role]["model"]
        b = torch.load(part / "last.pt", weights_only=True)["roles"][role]["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), role


def test_own_loop_resumes_bit_identically_from_its_checkpoint(tmp_path):
    import torch

    tiny = ("--subset", "384", "--epochs", "2", "--space", "1.5")  # N = 9 batches: a block spans the epoch end
    full, part = tmp_path / "full.pt", tmp_path / "part.pt"
    assert run("own_loop.py", *tiny, "--checkpoint", str(full), "--trace", str(tmp_path / "a.txt")).returncode == 0
    first = run("own_loop.py", *tiny, "--checkpoint", str(part), "--stop-after", "1",
                "--trace", str(tmp_path / "b.txt"))
    assert first.returncode == 0 and first.stdout.count("student test accuracy") == 1, first.stderr
    assert torch.load(part, weights_only=True)["replay"]["window"]["entries"], "the open block travels in the file"
    second = run("own_loop.py", *tiny, "--checkpoint", str(part), "--trace", str(tmp_path / "b.txt"))
    assert second.returncode == 0 and second.stdout.count("student test accuracy") == 1, second.stderr
    assert (tmp_path / "a.txt").read_text() == (tmp_path / "b.txt").read_text()
    a, b = torch.load(full, weights_only=True), torch.load(part, weights_only=True)
    for role in ("teacher", "student"):
        assert all(torch.equal(a[role][k], b[role][k]) for k in a[role]), role
