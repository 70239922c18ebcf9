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
